from services.proto.npo.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PutGuidesRequest(_message.Message):
    __slots__ = ("run", "guide_step", "guides")
    RUN_FIELD_NUMBER: _ClassVar[int]
    GUIDE_STEP_FIELD_NUMBER: _ClassVar[int]
    GUIDES_FIELD_NUMBER: _ClassVar[int]
    run: str
    guide_step: int
    guides: _containers.RepeatedCompositeFieldContainer[_common_pb2.Sample]
    def __init__(self, run: _Optional[str] = ..., guide_step: _Optional[int] = ..., guides: _Optional[_Iterable[_Union[_common_pb2.Sample, _Mapping]]] = ...) -> None: ...

class PutGuidesResponse(_message.Message):
    __slots__ = ("written",)
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    written: int
    def __init__(self, written: _Optional[int] = ...) -> None: ...

class GetGuidesRequest(_message.Message):
    __slots__ = ("run", "guide_step", "prompt_ids", "k")
    RUN_FIELD_NUMBER: _ClassVar[int]
    GUIDE_STEP_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    run: str
    guide_step: int
    prompt_ids: _containers.RepeatedScalarFieldContainer[str]
    k: int
    def __init__(self, run: _Optional[str] = ..., guide_step: _Optional[int] = ..., prompt_ids: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ...) -> None: ...

class GetGuidesResponse(_message.Message):
    __slots__ = ("guides",)
    GUIDES_FIELD_NUMBER: _ClassVar[int]
    guides: _containers.RepeatedCompositeFieldContainer[_common_pb2.Sample]
    def __init__(self, guides: _Optional[_Iterable[_Union[_common_pb2.Sample, _Mapping]]] = ...) -> None: ...

class ListGuideStepsRequest(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: str
    def __init__(self, run: _Optional[str] = ...) -> None: ...

class ListGuideStepsResponse(_message.Message):
    __slots__ = ("guide_steps",)
    GUIDE_STEPS_FIELD_NUMBER: _ClassVar[int]
    guide_steps: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, guide_steps: _Optional[_Iterable[int]] = ...) -> None: ...

class DeleteGuidesRequest(_message.Message):
    __slots__ = ("run", "guide_step")
    RUN_FIELD_NUMBER: _ClassVar[int]
    GUIDE_STEP_FIELD_NUMBER: _ClassVar[int]
    run: str
    guide_step: int
    def __init__(self, run: _Optional[str] = ..., guide_step: _Optional[int] = ...) -> None: ...

class DeleteGuidesResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class RecordMistakesRequest(_message.Message):
    __slots__ = ("run", "step", "prompt_ids")
    RUN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    run: str
    step: int
    prompt_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, run: _Optional[str] = ..., step: _Optional[int] = ..., prompt_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RecordMistakesResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetMistakesRequest(_message.Message):
    __slots__ = ("run", "lo", "hi")
    RUN_FIELD_NUMBER: _ClassVar[int]
    LO_FIELD_NUMBER: _ClassVar[int]
    HI_FIELD_NUMBER: _ClassVar[int]
    run: str
    lo: int
    hi: int
    def __init__(self, run: _Optional[str] = ..., lo: _Optional[int] = ..., hi: _Optional[int] = ...) -> None: ...

class Mistake(_message.Message):
    __slots__ = ("prompt_id", "step")
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    prompt_id: str
    step: int
    def __init__(self, prompt_id: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class GetMistakesResponse(_message.Message):
    __slots__ = ("mistakes",)
    MISTAKES_FIELD_NUMBER: _ClassVar[int]
    mistakes: _containers.RepeatedCompositeFieldContainer[Mistake]
    def __init__(self, mistakes: _Optional[_Iterable[_Union[Mistake, _Mapping]]] = ...) -> None: ...

class TruncateMistakesRequest(_message.Message):
    __slots__ = ("run", "from_step")
    RUN_FIELD_NUMBER: _ClassVar[int]
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    run: str
    from_step: int
    def __init__(self, run: _Optional[str] = ..., from_step: _Optional[int] = ...) -> None: ...

class TruncateMistakesResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: str
    def __init__(self, run: _Optional[str] = ...) -> None: ...

class GuideStepCount(_message.Message):
    __slots__ = ("guide_step", "guides")
    GUIDE_STEP_FIELD_NUMBER: _ClassVar[int]
    GUIDES_FIELD_NUMBER: _ClassVar[int]
    guide_step: int
    guides: int
    def __init__(self, guide_step: _Optional[int] = ..., guides: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("guide_steps", "guides", "mistakes")
    GUIDE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDES_FIELD_NUMBER: _ClassVar[int]
    MISTAKES_FIELD_NUMBER: _ClassVar[int]
    guide_steps: _containers.RepeatedCompositeFieldContainer[GuideStepCount]
    guides: int
    mistakes: int
    def __init__(self, guide_steps: _Optional[_Iterable[_Union[GuideStepCount, _Mapping]]] = ..., guides: _Optional[int] = ..., mistakes: _Optional[int] = ...) -> None: ...

class ClearRunRequest(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: str
    def __init__(self, run: _Optional[str] = ...) -> None: ...

class ClearRunResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
