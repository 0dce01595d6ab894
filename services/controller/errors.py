"""What the controller raises, and what the REST API answers for it (services/controller/api.py).

Busy -> 409 with the running intervention's id; Conflict -> 409; NotFound -> 404; ValueError and ConfigError -> 422;
anything else -> 500 with a one-line message (the traceback stays in the server log).
"""


class Busy(Exception):
    """Another intervention is running (one at a time)."""

    def __init__(self, running_id: str) -> None:
        super().__init__(f"intervention {running_id} is running; one intervention at a time")
        self.running_id = running_id


class Conflict(Exception):
    """The run's state forbids the request (e.g. a step past the run's end, a failed learner)."""


class NotFound(LookupError):
    """No such checkpoint or intervention."""
