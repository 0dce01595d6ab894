"""RolloutService end to end: real gRPC servers on 127.0.0.1 (ephemeral ports) over the transformers engine and a
tiny random policy, compared with the same engine in-process; weight sync, scoring under a checkpoint, replicas,
fail-over (a replica stopped, stopped mid-call, restarted on its port), health, status codes, and the command
line."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from npo.runtime.checkpoint import CheckpointManager
from npo.runtime.engine import Generation, SamplingParams, TransformersEngine
from npo.runtime.models import ModelConfig, load_policy
from npo.runtime.tasks import COMPACT_ALPHABET, TaskConfig, load_task
from npo.runtime.verify import verified_sample
from services.grpc_common import RetryPolicy, open_channel
from services.learner.publish import WeightPublisher
from services.proto.npo.v1 import common_pb2
from services.proto.npo.v1 import rollout_pb2 as pb
from services.proto.npo.v1 import rollout_pb2_grpc as pb_grpc
from services.rollout.client import RolloutClient, chunk_seed, split_contiguous
from services.rollout.server import SERVICE_NAME, main, serve

REPO = Path(__file__).resolve().parents[1]
FAST_RETRY = RetryPolicy(max_attempts=2, initial_backoff_s=0.05, max_backoff_s=0.1)
SAMPLED = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, stop_on_eos=True)
NUCLEUS = SamplingParams(temperature=0.7, top_p=0.8, max_new_tokens=6, stop_on_eos=False)
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8, stop_on_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_cfg(tmp_path_factory) -> ModelConfig:
    return ModelConfig(preset="tiny", warmup_steps=0, cache_dir=str(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="module")
def policy(model_cfg):
    return load_policy(model_cfg, seed=0, warmup_pairs=None, alphabet=COMPACT_ALPHABET)


@pytest.fixture(scope="module")
def task():
    return load_task(TaskConfig(train_size=50, test_size=10))


@pytest.fixture(scope="module")
def problems(task):
    return [*task.train[:4], task.test[0]]


def engine_over(policy, model: torch.nn.Module) -> TransformersEngine:
    return TransformersEngine(model, eos_id=policy.eos_id, pad_id=policy.pad_id)


@pytest.fixture(scope="module")
def local(policy) -> TransformersEngine:
    """The in-process reference engine over the policy's own weights (never changed by a test)."""
    return engine_over(policy, policy.model)


@pytest.fixture(scope="module")
def perturbed_model(policy) -> torch.nn.Module:
    model = copy.deepcopy(policy.model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, policy, perturbed_model) -> dict[str, Path]:
    """HF folders (model.save_pretrained) of the original and the perturbed weights."""
    root = tmp_path_factory.mktemp("folders")
    policy.model.save_pretrained(root / "original")
    perturbed_model.save_pretrained(root / "perturbed")
    return {"original": root / "original", "perturbed": root / "perturbed"}


@pytest.fixture
def start(policy, task):
    """Factory: a RolloutService over its own copy of the policy's weights; returns its address."""
    servers = []

    def start_one() -> str:
        engine = engine_over(policy, copy.deepcopy(policy.model))
        server, port = serve(engine, policy.tokenizer, task, "127.0.0.1:0")
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start_one
    for server in servers:
        server.stop(None)


@pytest.fixture
def client(start):
    with RolloutClient(start(), timeout_s=30.0, retry=FAST_RETRY) as opened:
        yield opened


def prompt_ids_of(policy, problems) -> tuple[list[str], list[list[int]]]:
    return [p.prompt_id for p in problems], [policy.encode_prompt(p) for p in problems]


def flat_generations(groups) -> list[tuple[list[int], list[float], bool]]:
    return [(g.token_ids, g.logprobs, g.finished) for group in groups for g in group]


def flat_samples(groups) -> list[tuple[list[int], list[float], bool]]:
    return [(s.response_ids, s.logprobs, s.finished) for group in groups for s in group]


# ----------------------------------------------------------------------------------------------------------------
# Generate and Score against the in-process engine.


@pytest.mark.parametrize("params", [SAMPLED, NUCLEUS, GREEDY], ids=["sampled", "nucleus", "greedy"])
def test_generate_equals_the_in_process_engine_and_verifies_with_the_task(
    client, local, policy, task, problems, params
):
    ids, prompts = prompt_ids_of(policy, problems)
    expected = local.generate(prompts, 3, params, seed=123)

    groups = client.generate_verified(ids, prompts, 3, params, seed=123)

    assert flat_samples(groups) == flat_generations(expected)  # tokens and log-probs bit-exact
    for problem, group in zip(problems, groups):
        assert [s.prompt_id for s in group] == [problem.prompt_id] * 3
        for sample in group:
            assert sample.text == policy.tokenizer.decode(sample.response_ids, skip_special_tokens=True)
            assert sample.reward == (task.reward(problem, sample.text) if sample.finished else 0.0)
            assert sample.policy_step == 0
    if params is SAMPLED:  # this seed covers both cases of the reward rule
        assert {s.finished for group in groups for s in group} == {True, False}
    assert flat_generations(client.generate(prompts, 3, params, seed=123)) == flat_generations(expected)


def test_verified_sample_rewards_only_a_finished_correct_answer(policy, task):
    problem = task.train[0]
    ids = policy.tokenizer(problem.solution, add_special_tokens=False)["input_ids"] + [policy.eos_id]
    decode = policy.tokenizer.decode

    def sample(finished: bool, verified_problem):
        generation = Generation(ids, [-0.25] * len(ids), finished)
        return verified_sample(
            problem.prompt_id,
            verified_problem,
            generation,
            lambda t: decode(t, skip_special_tokens=True),
            task.reward,
            7,
        )

    correct = sample(True, problem)
    assert (correct.reward, correct.text, correct.policy_step) == (1.0, problem.solution, 7)
    assert sample(False, problem).reward == 0.0  # unfinished: never rewarded
    assert sample(True, None).reward == 0.0  # no prompt_id: not verified
    assert sample(True, task.train[1]).reward == 0.0  # the same text is wrong for another problem


def test_score_equals_the_in_process_engine(client, local, policy, problems):
    _, prompts = prompt_ids_of(policy, problems)
    responses = [g.token_ids for g in (group[0] for group in local.generate(prompts, 1, NUCLEUS, seed=5))]
    responses[1] = []  # an empty response scores to an empty list

    for temperature in (1.0, 0.7):
        scored = client.score(prompts, responses, temperature=temperature)
        assert scored == local.score(prompts, responses, temperature=temperature)
    assert scored[1] == [] and all(len(s) == len(r) for s, r in zip(scored, responses))


# ----------------------------------------------------------------------------------------------------------------
# Weight sync and scoring under a checkpoint.


def test_load_policy_changes_outputs_and_score_under_the_old_folder_keeps_the_old_weights(
    client, local, policy, problems, folders, perturbed_model
):
    ids, prompts = prompt_ids_of(policy, problems)
    perturbed = engine_over(policy, perturbed_model)
    before = client.generate(prompts, 2, GREEDY, seed=0)
    assert flat_generations(before) == flat_generations(local.generate(prompts, 2, GREEDY, seed=0))

    (report,) = client.load_policy(folders["perturbed"], step=5, version="v5")
    assert (report.step, report.path, report.version) == (5, str(folders["perturbed"].resolve()), "v5")
    assert report.load_seconds > 0.0

    after = client.generate_verified(ids, prompts, 2, GREEDY, seed=0, expected_policy_step=5)
    assert flat_samples(after) == flat_generations(perturbed.generate(prompts, 2, GREEDY, seed=0))
    assert flat_samples(after) != flat_generations(before)
    assert {s.policy_step for group in after for s in group} == {5}

    responses = [s.response_ids for group in after for s in group][::2]
    current = client.score(prompts, responses, temperature=1.0)
    assert current == perturbed.score(prompts, responses, temperature=1.0)
    old = client.score(prompts, responses, temperature=1.0, checkpoint=folders["original"], step=0)
    assert old == local.score(prompts, responses, temperature=1.0)
    # naming the loaded folder scores with the loaded policy itself
    assert client.score(prompts, responses, temperature=1.0, checkpoint=folders["perturbed"]) == current

    (again,) = client.load_policy(folders["perturbed"], step=5, version="v5")
    assert again.load_seconds == 0.0  # already loaded: a no-op
    with pytest.raises(
        RuntimeError, match="FAILED_PRECONDITION.*expected_policy_step: 0, but the loaded policy is of step 5"
    ):
        client.generate_verified(ids, prompts, 1, GREEDY, seed=0, expected_policy_step=0)


def test_load_policy_verifies_checkpoint_folders(client, local, policy, problems, tmp_path, perturbed_model):
    _, prompts = prompt_ids_of(policy, problems)
    manager = CheckpointManager(tmp_path / "checkpoints")
    good = manager.save(3, perturbed_model.save_pretrained, trainer_state={})
    corrupted = manager.save(4, policy.model.save_pretrained, trainer_state={})
    with open(corrupted / "model.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")

    (report,) = client.load_policy(good)  # step -1: the checkpoint's own
    assert report.step == 3
    assert report.version == manager.verify(3)["sha256"]["model.safetensors"]
    with pytest.raises(ValueError, match="checkpoint.step: 9, but .* is the checkpoint of step 3"):
        client.load_policy(good, step=9)
    with pytest.raises(RuntimeError, match="DATA_LOSS.*model.safetensors is corrupted"):
        client.load_policy(corrupted)
    with pytest.raises(RuntimeError, match="DATA_LOSS.*corrupted"):
        client.score(prompts, [[5]] * len(prompts), temperature=1.0, checkpoint=corrupted)
    # the refused checkpoint left the loaded policy untouched
    perturbed = engine_over(policy, perturbed_model)
    groups = client.generate_verified([""] * len(prompts), prompts, 1, GREEDY, seed=0, expected_policy_step=3)
    assert flat_samples(groups) == flat_generations(perturbed.generate(prompts, 1, GREEDY, seed=0))


def test_a_load_that_fails_half_way_blocks_sampling_until_a_good_load(
    client, local, policy, problems, tmp_path, folders
):
    _, prompts = prompt_ids_of(policy, problems)
    wider = load_policy(
        ModelConfig(preset="tiny", warmup_steps=0, hidden_size=64, intermediate_size=128, cache_dir=str(tmp_path)),
        seed=0,
        alphabet=COMPACT_ALPHABET,
    )
    wider.model.save_pretrained(tmp_path / "other-shape")

    with pytest.raises(ValueError, match="do not fit the policy model"):
        client.load_policy(tmp_path / "other-shape", step=1)
    with pytest.raises(RuntimeError, match="FAILED_PRECONDITION.*no usable policy"):
        client.generate(prompts, 1, GREEDY, seed=0)
    with pytest.raises(RuntimeError, match="FAILED_PRECONDITION.*no usable policy"):
        client.score(prompts, [[5]] * len(prompts), temperature=1.0)

    client.load_policy(folders["original"], step=0)
    assert flat_generations(client.generate(prompts, 1, GREEDY, seed=0)) == flat_generations(
        local.generate(prompts, 1, GREEDY, seed=0)
    )


# ----------------------------------------------------------------------------------------------------------------
# Replicas.


def test_split_contiguous_and_chunk_seed():
    assert split_contiguous(5, 2) == [range(0, 3), range(3, 5)]
    assert split_contiguous(2, 3) == [range(0, 1), range(1, 2)]
    assert split_contiguous(0, 2) == []
    assert chunk_seed(42, 0, 1) == 42  # an unsplit call keeps its seed
    seeds = [chunk_seed(42, c, 3) for c in range(3)]
    assert len(set(seeds)) == 3 and 42 not in seeds and seeds[0] == chunk_seed(42, 0, 2)


def test_two_replicas_split_a_call_into_contiguous_chunks_in_input_order(
    start, local, policy, problems, folders, perturbed_model
):
    ids, prompts = prompt_ids_of(policy, problems)  # 5 prompts: chunks [0, 3) and [3, 5)
    first, second = start(), start()
    with RolloutClient([first, second], timeout_s=30.0, retry=FAST_RETRY) as replicas:
        groups = replicas.generate_verified(ids, prompts, 2, SAMPLED, seed=9)
        expected = local.generate(prompts[:3], 2, SAMPLED, seed=chunk_seed(9, 0, 2)) + local.generate(
            prompts[3:], 2, SAMPLED, seed=chunk_seed(9, 1, 2)
        )
        assert flat_samples(groups) == flat_generations(expected)
        assert [group[0].prompt_id for group in groups] == ids

        # the second chunk goes to the second replica: give it other weights
        with RolloutClient(second, timeout_s=30.0, retry=FAST_RETRY) as only_second:
            only_second.load_policy(folders["perturbed"], step=2)
        perturbed = engine_over(policy, perturbed_model)
        responses = [group[0].response_ids for group in groups]
        scored = replicas.score(prompts, responses, temperature=1.0)
        assert scored[:3] == local.score(prompts[:3], responses[:3], temperature=1.0)
        assert scored[3:] == perturbed.score(prompts[3:], responses[3:], temperature=1.0)

        reports = replicas.load_policy(folders["perturbed"], step=2)
        assert [(r.address, r.step) for r in reports] == [(first, 2), (second, 2)]
        assert reports[0].load_seconds > 0.0 and reports[1].load_seconds == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Fail-over: a replica down, stopped mid-call, restarted on the same port.


class Replica:
    """One RolloutService over its own copy of the policy's weights, which can be stopped and started again on the
    same port (as a fresh process would: start-up weights, a new server instance)."""

    def __init__(self, policy, task, engine_class=TransformersEngine) -> None:
        self.policy, self.task, self.engine_class = policy, task, engine_class
        self.server, self.port = None, 0

    def start(self) -> Replica:
        engine = self.engine_class(
            copy.deepcopy(self.policy.model), eos_id=self.policy.eos_id, pad_id=self.policy.pad_id
        )
        self.server, self.port = serve(engine, self.policy.tokenizer, self.task, f"127.0.0.1:{self.port}")
        return self

    def stop(self) -> None:
        self.server.stop(None).wait()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def fleet(policy, task):
    """Factory: a started Replica (engine_class: its engine); every one is stopped at the end."""
    made: list[Replica] = []

    def make(engine_class=TransformersEngine) -> Replica:
        made.append(Replica(policy, task, engine_class).start())
        return made[-1]

    yield make
    for replica in made:
        replica.server.stop(None)


def failover_client(*replicas: Replica, **options) -> RolloutClient:
    return RolloutClient([r.address for r in replicas], timeout_s=30.0, retry=FAST_RETRY, **options)


def two_chunks(engine: TransformersEngine, prompts, n: int, params: SamplingParams, seed: int) -> list:
    """What a call split into 2 chunks ([0, 3) and [3, 5) of 5 prompts) samples, whichever replica serves a chunk."""
    first = engine.generate(prompts[:3], n, params, seed=chunk_seed(seed, 0, 2))
    return first + engine.generate(prompts[3:], n, params, seed=chunk_seed(seed, 1, 2))


def test_chunks_are_the_same_whether_two_replicas_serve_them_or_one_is_down(fleet, local, policy, problems):
    ids, prompts = prompt_ids_of(policy, problems)
    first, second = fleet(), fleet()
    expected = flat_generations(two_chunks(local, prompts, 2, SAMPLED, seed=9))
    with failover_client(first, second) as client:
        both = client.generate_verified(ids, prompts, 2, SAMPLED, seed=9)
        responses = [group[0].response_ids for group in both]
        scored = client.score(prompts, responses, temperature=1.0)
        second.stop()
        one = client.generate_verified(ids, prompts, 2, SAMPLED, seed=9)
        assert flat_samples(both) == flat_samples(one) == expected
        assert client.score(prompts, responses, temperature=1.0) == scored
        assert (client.live_replicas, client.replica_drops, client.replica_rejoins) == ([first.address], 1, 0)
        assert [group[0].prompt_id for group in one] == ids

        first.stop()  # none left: the call waits outage_timeout_s, then names every replica
        client.outage_timeout_s = 0.3
        with pytest.raises(ConnectionError, match=f"no live replica among .*{first.address}.*{second.address}"):
            client.generate(prompts, 1, GREEDY, seed=0)


class SlowEngine(TransformersEngine):
    """A TransformersEngine that signals when a generation starts and takes 1 s longer."""

    started = threading.Event()

    def generate(self, *args, **kwargs):
        SlowEngine.started.set()
        time.sleep(1.0)
        return super().generate(*args, **kwargs)


def test_a_replica_stopped_mid_call_has_its_chunk_served_by_another(fleet, local, policy, problems):
    ids, prompts = prompt_ids_of(policy, problems)
    first, second = fleet(), fleet(SlowEngine)
    SlowEngine.started.clear()
    with failover_client(first, second) as client:
        stopper = threading.Thread(target=lambda: SlowEngine.started.wait(30) and second.stop())
        stopper.start()
        groups = client.generate_verified(ids, prompts, 2, SAMPLED, seed=9)
        stopper.join()
        assert SlowEngine.started.is_set()
        assert flat_samples(groups) == flat_generations(two_chunks(local, prompts, 2, SAMPLED, seed=9))
        assert (client.live_replicas, client.replica_drops) == ([first.address], 1)


def test_a_replica_restarted_on_its_port_rejoins_with_the_current_weights(
    fleet, local, policy, problems, perturbed_model, tmp_path
):
    ids, prompts = prompt_ids_of(policy, problems)
    first, second = fleet(), fleet()
    perturbed = engine_over(policy, perturbed_model)
    expected = flat_generations(two_chunks(perturbed, prompts, 2, SAMPLED, seed=3))
    with failover_client(first, second, health_interval_s=0.05) as client:
        second.stop()
        publish = WeightPublisher(perturbed_model, client, tmp_path / "published")
        publish(7)  # the dead replica does not fail the publication
        assert (publish.replicas_loaded, publish.replica_drops, publish.live_replicas) == (1, 1, 1)
        assert flat_samples(client.generate_verified(ids, prompts, 2, SAMPLED, seed=3)) == expected

        second.start()  # same port, start-up weights
        time.sleep(0.1)
        groups = client.generate_verified(ids, prompts, 2, SAMPLED, seed=3, expected_policy_step=7)
        assert (client.live_replicas, publish.replica_rejoins) == ([first.address, second.address], 1)
        assert flat_samples(groups) == expected  # chunk 1 was served by the rejoined replica, on the current weights
        assert client.current_weights.version == "publish-1-step-7"

        # restarted between two calls, unseen by any failed call: its answer from a new instance is not used
        second.stop()
        second.start()
        groups = client.generate_verified(ids, prompts, 2, SAMPLED, seed=3, expected_policy_step=7)
        assert flat_samples(groups) == expected
        assert client.replica_drops == 2
        time.sleep(0.1)
        assert flat_samples(client.generate_verified(ids, prompts, 2, SAMPLED, seed=3)) == expected
        assert (client.live_replicas, client.replica_rejoins) == ([first.address, second.address], 2)


def test_a_call_with_no_live_replica_waits_for_one_to_rejoin(fleet, policy, problems, perturbed_model, folders):
    _, prompts = prompt_ids_of(policy, problems)
    only = fleet()
    with failover_client(only, health_interval_s=0.05) as client:
        client.load_policy(folders["perturbed"], step=4, version="v4")
        only.stop()
        threading.Timer(0.5, only.start).start()
        groups = client.generate(prompts, 1, GREEDY, seed=0)
    perturbed = engine_over(policy, perturbed_model)
    assert flat_generations(groups) == flat_generations(perturbed.generate(prompts, 1, GREEDY, seed=0))


# ----------------------------------------------------------------------------------------------------------------
# Health and status codes.


def test_health_reports_serving(start):
    with grpc.insecure_channel(start()) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5.0)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def sampling(**fields) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**{"temperature": 1.0, "max_new_tokens": 4, "stop_on_eos": True, **fields})


def bad_requests(problem_id: str, tmp: Path) -> list:
    """(method, request, status, message) of every bad request the tests send."""
    return bad_generate_requests(problem_id) + bad_score_and_load_requests(tmp)


def bad_generate_requests(problem_id: str) -> list:
    prompt = pb.Prompt(prompt_id=problem_id, token_ids=[1, 5, 6])
    generate, invalid = "Generate", grpc.StatusCode.INVALID_ARGUMENT
    return [
        (generate, pb.GenerateRequest(prompts=[], n=1, sampling=sampling()), invalid, "prompts: need at least one"),
        (
            generate,
            pb.GenerateRequest(prompts=[pb.Prompt(prompt_id="nope", token_ids=[1, 5])], n=1, sampling=sampling()),
            invalid,
            "prompts[0].prompt_id: unknown prompt id 'nope'",
        ),
        (
            generate,
            pb.GenerateRequest(prompts=[prompt, pb.Prompt(prompt_id=problem_id)], n=1, sampling=sampling()),
            invalid,
            "prompts[1].token_ids: empty",
        ),
        (
            generate,
            pb.GenerateRequest(prompts=[pb.Prompt(token_ids=[1, 999])], n=1, sampling=sampling()),
            invalid,
            "prompts[0].token_ids: token id 999 is outside the vocabulary",
        ),
        (generate, pb.GenerateRequest(prompts=[prompt], n=0, sampling=sampling()), invalid, "n: must be >= 1, got 0"),
        (
            generate,
            pb.GenerateRequest(prompts=[prompt], n=1, sampling=sampling(temperature=-0.5)),
            invalid,
            "sampling.temperature: must be >= 0",
        ),
        (
            generate,
            pb.GenerateRequest(prompts=[prompt], n=1, sampling=sampling(max_new_tokens=0)),
            invalid,
            "sampling.max_new_tokens: must be >= 1",
        ),
        (
            generate,
            pb.GenerateRequest(prompts=[prompt], n=1, sampling=sampling(), task="countdown"),
            invalid,
            "task: this server verifies task 'chain_sum'",
        ),
        (
            generate,
            pb.GenerateRequest(
                prompts=[pb.Prompt(prompt_id=problem_id, token_ids=[1, 5], answer="-1")], n=1, sampling=sampling()
            ),
            invalid,
            "prompts[0].answer: '-1' differs",
        ),
    ]


def bad_score_and_load_requests(tmp: Path) -> list:
    missing = str(tmp / "no-such-folder")
    score, load = "Score", "LoadPolicy"
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    return [
        (score, pb.ScoreRequest(sequences=[pb.ScoredSequence(response_ids=[5])]), invalid, "sequences[0].prompt_ids"),
        (
            score,
            pb.ScoreRequest(sequences=[pb.ScoredSequence(prompt_ids=[1], response_ids=[5])], temperature=-1.0),
            invalid,
            "temperature: must be > 0",
        ),
        (
            score,
            pb.ScoreRequest(
                checkpoint=common_pb2.CheckpointInfo(path=missing),
                sequences=[pb.ScoredSequence(prompt_ids=[1], response_ids=[5])],
            ),
            not_found,
            "checkpoint.path: no such folder",
        ),
        (load, pb.LoadPolicyRequest(), invalid, "checkpoint: required"),
        (
            load,
            pb.LoadPolicyRequest(checkpoint=common_pb2.CheckpointInfo(path=missing, step=3)),
            not_found,
            "checkpoint.path: no such folder",
        ),
        (
            load,
            pb.LoadPolicyRequest(checkpoint=common_pb2.CheckpointInfo(path=str(tmp), step=3)),
            invalid,
            "has no model.safetensors",
        ),
        (
            load,
            pb.LoadPolicyRequest(checkpoint=common_pb2.CheckpointInfo(path=str(tmp), step=-2)),
            invalid,
            "checkpoint.step: must be >= 0",
        ),
    ]


def test_bad_requests_are_answered_with_a_status_and_a_message_naming_the_field(start, problems, tmp_path):
    channel = open_channel(start(), [pb.DESCRIPTOR.services_by_name["RolloutService"]], timeout_s=10.0)
    stub = pb_grpc.RolloutServiceStub(channel)
    try:
        for method, request, code, message in bad_requests(problems[0].prompt_id, tmp_path):
            with pytest.raises(grpc.RpcError) as caught:
                getattr(stub, method)(request)
            assert (caught.value.code(), method) == (code, method)
            assert message in caught.value.details(), (method, caught.value.details())
    finally:
        channel.close()


def test_client_raises_builtin_exceptions(client, policy, problems, tmp_path):
    _, prompts = prompt_ids_of(policy, problems)
    with pytest.raises(ValueError, match="unknown prompt id 'nope'"):
        client.generate_verified(["nope"], prompts[:1], 1, GREEDY, seed=0)
    with pytest.raises(LookupError, match="no such folder"):
        client.load_policy(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"prompts\[0\]: token id 1.5 is not an int32"):
        client.generate([[1, 1.5]], 1, GREEDY, seed=0)
    with pytest.raises(ValueError, match="seed: expected an integer in"):
        client.generate(prompts, 1, GREEDY, seed=-1)
    with pytest.raises(NotImplementedError, match="load_policy"):
        client.load_state_dict({})
    assert client.generate([], 2, GREEDY, seed=0) == []


# ----------------------------------------------------------------------------------------------------------------
# Command line.


def test_main_rejects_a_missing_config(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "absent.yaml"), "--address", "127.0.0.1:0"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_main_serves_the_run_configs_policy(tmp_path, model_cfg, local, policy, problems):
    config = tmp_path / "run.yaml"
    config.write_text(f"seed: 0\nmodel: {{preset: tiny, cache_dir: {tmp_path}}}\ntask: {{train_size: 50}}\n")
    command = [sys.executable, "-m", "services.rollout", "--config", str(config), "--threads", "1"]
    command += ["--set", "model.warmup_steps=0", "--set", "task.test_size=10", "--address", "127.0.0.1:0"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()
        assert "rollout: serving on 127.0.0.1:" in line, line
        address = line.split("serving on ", 1)[1].split()[0]
        ids, prompts = prompt_ids_of(policy, problems)
        with RolloutClient(address, timeout_s=30.0, retry=FAST_RETRY) as remote:
            groups = remote.generate_verified(ids, prompts, 2, SAMPLED, seed=4)
        assert flat_samples(groups) == flat_generations(local.generate(prompts, 2, SAMPLED, seed=4))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
