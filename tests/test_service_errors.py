"""Malformed and oversized requests to every service (real servers on 127.0.0.1): a status code with a message,
never a crash, and the server keeps serving."""

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from npo.runtime.engine import TransformersEngine
from npo.runtime.models import load_policy
from npo.runtime.run_config import load_run_config
from npo.runtime.runner import Runner
from npo.runtime.store import MemoryGuideStore
from npo.runtime.tasks import COMPACT_ALPHABET, load_task
from services.guidance_cache.server import serve as serve_cache
from services.learner.server import serve as serve_learner
from services.proto.npo.v1 import common_pb2, learner_pb2, rollout_pb2
from services.proto.npo.v1 import guidance_cache_pb2 as cache_pb2
from services.rollout.server import serve as serve_rollout

LIMIT = 64 * 1024  # the servers' message size limit in this file
DESCRIPTORS = {
    "npo.v1.GuidanceCacheService": cache_pb2,
    "npo.v1.RolloutService": rollout_pb2,
    "npo.v1.LearnerService": learner_pb2,
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("errors")
    cfg = load_run_config(
        None,
        [
            f"model.cache_dir={root / 'models'}",
            "model.warmup_steps=20",
            "task.train_size=40",
            "task.test_size=10",
            "train.prompts_per_step=4",
            "algo.group_size=2",
            "rollout.max_new_tokens=3",
            "eval.every=0",
        ],
    )
    task = load_task(cfg.task)
    pairs = [(p.compact_prompt, p.solution) for p in task.train]
    policy = load_policy(cfg.model, seed=0, warmup_pairs=pairs, alphabet=COMPACT_ALPHABET)
    engine = TransformersEngine(policy.model, eos_id=policy.eos_id, pad_id=policy.pad_id)
    runner = Runner(cfg, root / "run", policy=policy, task=task, store=MemoryGuideStore(), progress=False)
    started = {
        "npo.v1.GuidanceCacheService": serve_cache(MemoryGuideStore(), max_message_bytes=LIMIT),
        "npo.v1.RolloutService": serve_rollout(engine, policy.tokenizer, task, max_message_bytes=LIMIT),
        "npo.v1.LearnerService": serve_learner(runner, max_message_bytes=LIMIT),
    }
    yield {name: f"127.0.0.1:{port}" for name, (_, port) in started.items()}
    for server, _ in started.values():
        server.stop(grace=None)


def raw_call(address, service, method, payload: bytes, timeout=30):
    """Send `payload` bytes as the request of service/method; returns (code, details)."""
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * 2**20)]) as channel:
        call = channel.unary_unary(f"/{service}/{method}")  # bytes in, bytes out
        try:
            call(payload, timeout=timeout)
        except grpc.RpcError as error:
            return error.code(), error.details()
    return grpc.StatusCode.OK, ""


def healthy(address):
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def methods(service):
    module = DESCRIPTORS[service]
    return list(module.DESCRIPTOR.services_by_name[service.split(".")[-1]].methods_by_name)


ALL = [(service, method) for service in DESCRIPTORS for method in methods(service)]


@pytest.mark.parametrize(("service", "method"), ALL, ids=[f"{s.split('.')[-1]}.{m}" for s, m in ALL])
def test_bytes_that_do_not_parse_are_invalid_argument(servers, service, method):
    code, details = raw_call(servers[service], service, method, b"\x0f\xff\xff\xff")
    assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "not a valid message" in details and method in details
    assert healthy(servers[service])


def test_oversized_requests_are_resource_exhausted_and_the_servers_keep_serving(servers):
    big_prompts = rollout_pb2.GenerateRequest(
        prompts=[rollout_pb2.Prompt(prompt_id=f"p{i}", token_ids=[5] * 256) for i in range(400)], n=1
    )
    big_label = learner_pb2.RunSegmentRequest(from_step=0, length=1, mode=1, label="x" * (LIMIT + 1))
    guide = common_pb2.Sample(prompt_id="p", response_ids=[5] * 5000, logprobs=[-0.1] * 5000)
    big_guides = cache_pb2.PutGuidesRequest(run="r", guide_step=1, guides=[guide] * 8)
    cases = [
        ("npo.v1.RolloutService", "Generate", big_prompts),
        ("npo.v1.LearnerService", "RunSegment", big_label),
        ("npo.v1.GuidanceCacheService", "PutGuides", big_guides),
    ]
    for service, method, message in cases:
        payload = message.SerializeToString()
        assert len(payload) > LIMIT
        code, details = raw_call(servers[service], service, method, payload)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (service, code, details)
        assert healthy(servers[service])


def test_well_formed_but_wrong_values_are_invalid_argument_naming_the_field(servers):
    cases = [
        ("npo.v1.LearnerService", "RunSegment", learner_pb2.RunSegmentRequest(from_step=0, length=1), "mode"),
        ("npo.v1.LearnerService", "Rollback", learner_pb2.RollbackRequest(to_step=-5), "to_step"),
        ("npo.v1.RolloutService", "Generate", rollout_pb2.GenerateRequest(n=1), "prompts"),
        (
            "npo.v1.RolloutService",
            "Score",
            rollout_pb2.ScoreRequest(sequences=[rollout_pb2.ScoredSequence(prompt_ids=[10**6])]),
            "prompt_ids",
        ),
        ("npo.v1.GuidanceCacheService", "GetGuides", cache_pb2.GetGuidesRequest(run="", guide_step=1), "run"),
    ]
    for service, method, message, field in cases:
        code, details = raw_call(servers[service], service, method, message.SerializeToString())
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (service, method, code, details)
        assert field in details, (service, method, details)
