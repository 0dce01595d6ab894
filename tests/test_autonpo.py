"""AutoNPO bookkeeping and decisions (npo/core/autonpo.py): trigger, Q_hat/V_hat/S_hat, Delta*."""

import math

import pytest

from npo.core.autonpo import (
    AutoNPO,
    CandidateEstimate,
    PlateauDetector,
    TriggerReading,
    choose_delta,
    estimate_candidate,
    mean_token_kl,
    q_hat,
    v_hat,
)
from npo.core.config import AutoNPOConfig


def reading(step: int, warning: bool = True) -> TriggerReading:
    return TriggerReading(step, 0.5, 1.0, 0.0, 0.5, warning)


def candidate(delta: int, q: float, v: float, n: int = 4, step: int = 100) -> CandidateEstimate:
    return CandidateEstimate(delta, step - delta, q, math.log(v), v, q / v, n)


# ---------------------------------------------------------------------------------------------------------------
# The trigger's warning stage


def test_trigger_warning_by_hand():
    cfg = AutoNPOConfig(ema_decay=0.5, window=2, reward_gain_min=0.01, entropy_drop_frac=0.1)
    detector = PlateauDetector(cfg)
    # step 0: reward EMA 0.5, entropy EMA 2.0
    # step 1: reward EMA 0.5, entropy EMA 0.5*2.0 + 0.5*1.0 = 1.5      (only 2 observations: window not filled)
    # step 2: reward EMA 0.5, entropy EMA 0.5*1.5 + 0.5*1.0 = 1.25
    #         gain = 0.5 - 0.5 = 0 < 0.01 (stagnant);  drop = (2.0 - 1.25) / 2.0 = 0.375 >= 0.1 (declining) -> warning
    first = detector.observe(0, 0.5, 2.0)
    second = detector.observe(1, 0.5, 1.0)
    third = detector.observe(2, 0.5, 1.0)
    assert (first.reward_gain, first.entropy_drop, first.warning) == (None, None, False)
    assert (second.entropy_ema, second.reward_gain, second.warning) == (1.5, None, False)
    assert third.entropy_ema == 1.25
    assert third.reward_gain == 0.0
    assert third.entropy_drop == pytest.approx(0.375)
    assert third.warning and third.step == 2


def test_no_warning_while_reward_rises():
    cfg = AutoNPOConfig(ema_decay=0.5, window=2)
    detector = PlateauDetector(cfg)
    # reward EMA 0.2, 0.4, 0.7: gain = 0.7 - 0.2 = 0.5 >= 0.01 -> no warning although the entropy EMA fell 37.5%
    for step, (r, h) in enumerate([(0.2, 2.0), (0.6, 1.0), (1.0, 1.0)]):
        last = detector.observe(step, r, h)
    assert last.reward_gain == pytest.approx(0.5)
    assert last.entropy_drop == pytest.approx(0.375)
    assert not last.warning


@pytest.mark.parametrize(("require_entropy_drop", "expected"), [(True, False), (False, True)])
def test_flat_entropy_warns_only_without_entropy_requirement(require_entropy_drop, expected):
    cfg = AutoNPOConfig(ema_decay=0.5, window=2, require_entropy_drop=require_entropy_drop)
    detector = PlateauDetector(cfg)
    for step in range(3):
        last = detector.observe(step, 0.3, 1.0)  # gain 0, drop 0
    assert last.entropy_drop == 0.0
    assert last.warning is expected


def test_detector_truncate_and_state_round_trip():
    cfg = AutoNPOConfig(ema_decay=0.5, window=2)
    detector = PlateauDetector(cfg)
    for step, (r, h) in enumerate([(0.1, 2.0), (0.2, 1.5), (0.3, 1.0), (0.4, 0.9)]):
        detector.observe(step, r, h)
    restored = PlateauDetector(cfg)
    restored.load_state_dict(detector.state_dict())
    assert restored.reading() == detector.reading()
    # rollback to step 2: observations 2 and 3 are forgotten; step 2 may be observed again
    detector.truncate(2)
    assert detector.reading().step == 1
    assert detector.reading().reward_ema == pytest.approx(0.15)  # 0.5*0.1 + 0.5*0.2
    assert detector.observe(2, 0.3, 1.0).step == 2


def test_detector_rejects_bad_observations():
    detector = PlateauDetector(AutoNPOConfig())
    with pytest.raises(ValueError, match="no observation"):
        detector.reading()
    detector.observe(5, 0.1, 1.0)
    with pytest.raises(ValueError, match="step"):
        detector.observe(5, 0.1, 1.0)
    with pytest.raises(ValueError, match="reward"):
        detector.observe(6, math.nan, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Q_hat, V_hat, S_hat and Delta*


def test_mean_token_kl_by_hand():
    # two sequences, 3 tokens; log pi^(t) and log pi^(t-Delta):
    #   d = past - current = [ln 0.5, 0] and [ln 2]
    #   k1 = -d = [0.6931472, 0, -0.6931472] -> mean 0
    #   k3 = exp(d) - d - 1 = [0.5 + 0.6931472 - 1, 0, 2 - 0.6931472 - 1] = [0.1931472, 0, 0.3068528] -> mean 1/6
    current = [[-1.0, -2.0], [-3.0]]
    past = [[-1.0 + math.log(0.5), -2.0], [-3.0 + math.log(2.0)]]
    assert mean_token_kl(current, past, "k1") == pytest.approx(0.0, abs=1e-12)
    assert mean_token_kl(current, past, "k3") == pytest.approx((0.1931472 + 0.3068528) / 3, abs=1e-7)


def test_mean_token_kl_rejects_bad_input():
    with pytest.raises(ValueError, match="logp_past"):
        mean_token_kl([[-1.0]], [])
    with pytest.raises(ValueError, match="logp_past\\[0\\]"):
        mean_token_kl([[-1.0, -1.0]], [[-1.0]])
    with pytest.raises(ValueError, match="estimator"):
        mean_token_kl([[-1.0]], [[-1.0]], "k2")
    with pytest.raises(ValueError, match="logp_current"):
        mean_token_kl([[]], [[]])


def test_q_hat_v_hat_s_hat_by_hand():
    # B at step t = 100: a failed at 95, b at 92, c at 85, e at 30; probed and solved by pi^(t): a yes, b no, c yes
    solved = {"a": True, "b": False, "c": True}
    failed_at = {"a": 95, "b": 92, "c": 85, "e": 30}
    # Q_hat over B_20 = {a, b, c} = 2/3 ; e is outside [80, 100)
    assert q_hat(solved, ["a", "b", "c"]) == (pytest.approx(2 / 3), 3)
    assert q_hat(solved, ["e"]) == (0.0, 0)  # unprobed prompts do not count
    # V_hat = exp(beta K) = exp(100 * 0.002) = exp(0.2) = 1.2214028
    assert v_hat(0.002, 100.0) == pytest.approx(1.2214028, abs=1e-7)
    assert v_hat(10.0, 100.0) == math.inf  # exponent 1000 saturates
    est = estimate_candidate(20, 100, solved, failed_at, kl=0.002, beta=100.0)
    # S_hat = Q_hat / V_hat = 0.6666667 / 1.2214028 = 0.5458205
    assert (est.delta, est.rollback_step, est.n_prompts) == (20, 80, 3)
    assert est.q_hat == pytest.approx(2 / 3)
    assert est.s_hat == pytest.approx(0.5458205, abs=1e-7)
    assert estimate_candidate(20, 100, solved, failed_at, kl=10.0, beta=100.0).s_hat == 0.0


def test_q_hat_v_hat_estimate_reject_bad_input():
    with pytest.raises(ValueError, match="beta"):
        v_hat(0.1, -1.0)
    with pytest.raises(ValueError, match="kl"):
        v_hat(math.nan, 1.0)
    with pytest.raises(ValueError, match="delta"):
        estimate_candidate(0, 100, {}, {}, 0.0, 1.0)


def test_s_hat_of_underflowing_v_hat_ranks_first():
    solved, failed_at = {"a": True}, {"a": 95}
    # k1 on few samples can be negative: K = -2, beta = 500 -> V_hat = exp(-1000) ~ 0 -> S_hat = Q / V_hat is huge
    low_variance = estimate_candidate(10, 100, solved, failed_at, kl=-2.0, beta=500.0)
    neutral = estimate_candidate(20, 100, solved, failed_at, kl=0.0, beta=500.0)  # S_hat = 1 / 1 = 1
    assert low_variance.s_hat > neutral.s_hat
    assert choose_delta([low_variance, neutral], q_min=0.1).delta == 10


def test_choose_delta_argmax_s_hat():
    # S = Q / V: 0.5/1.1 = 0.4545, 0.6/1.2 = 0.5, 0.8/2.0 = 0.4 -> Delta* = 20
    cands = [candidate(10, 0.5, 1.1), candidate(20, 0.6, 1.2), candidate(40, 0.8, 2.0)]
    assert choose_delta(cands, q_min=0.1).delta == 20


def test_choose_delta_q_min_rule_applies_to_the_argmax():
    # Delta = 10: S = 0.25 / 1 = 0.25 (argmax) but Q = 0.25 < q_min = 0.3 -> no intervention,
    # even though Delta = 20 has Q = 0.5 >= q_min (its S = 0.5 / 7.389 = 0.0677 is lower)
    cands = [candidate(10, 0.25, 1.0), candidate(20, 0.5, math.e**2)]
    assert choose_delta(cands, q_min=0.3) is None
    assert choose_delta(cands, q_min=0.25).delta == 10  # Q_hat(Delta*) >= q_min: inclusive


def test_choose_delta_tie_prefers_smaller_delta():
    # S equal (0.5 / 1 = 1.0 / 2): the smaller rollback distance wins, whatever the input order
    cands = [candidate(40, 1.0, 2.0), candidate(20, 0.5, 1.0)]
    assert cands[0].s_hat == cands[1].s_hat
    assert choose_delta(cands, q_min=0.1).delta == 20
    assert choose_delta(list(reversed(cands)), q_min=0.1).delta == 20


def test_choose_delta_needs_prompts_and_candidates():
    assert choose_delta([candidate(10, 0.0, 1.0, n=0)], q_min=0.0) is None  # empty B_Delta: nothing to guide
    with pytest.raises(ValueError, match="candidates"):
        choose_delta([], q_min=0.1)


# ---------------------------------------------------------------------------------------------------------------
# AutoNPO: decide, cool-down, probe, rollback


def hand_pool():
    # t = 100. Failed at: a 95, b 92, c 85, d 70, e 30. Probe of pi^(t): a, c, d solved; b not; e not probed.
    return {"a": 95, "b": 92, "c": 85, "d": 70, "e": 30}, {"a": True, "b": False, "c": True, "d": True}


def test_decide_by_hand():
    auto = AutoNPO(AutoNPOConfig(beta=100.0, q_min=0.1, candidate_deltas=[10, 20, 40]))
    mistakes, solved = hand_pool()
    decision = auto.decide(100, mistakes, solved, {10: 0.001, 20: 0.002, 40: 0.004}, mean_response_length=7.0)
    # Delta=10: B=[90,100)={a,b}     Q=1/2  V=exp(100*0.001)=1.1051709  S=0.4524187
    # Delta=20: B=[80,100)={a,b,c}   Q=2/3  V=exp(0.2)=1.2214028        S=0.5458205   <- argmax
    # Delta=40: B=[60,100)={a,b,c,d} Q=3/4  V=exp(0.4)=1.4918247        S=0.5027400
    by_delta = {c.delta: c for c in decision.candidates}
    assert by_delta[10].s_hat == pytest.approx(0.4524187, abs=1e-7)
    assert by_delta[20].s_hat == pytest.approx(0.5458205, abs=1e-7)
    assert by_delta[40].s_hat == pytest.approx(0.5027400, abs=1e-7)
    assert (by_delta[40].q_hat, by_delta[40].n_prompts) == (0.75, 4)
    assert decision.delta == 20
    assert (decision.trigger_step, decision.rollback_step, decision.guide_step, decision.segment_length) == (
        100,
        80,
        100,
        20,
    )
    assert decision.prompt_ids == ("a", "c")  # B_20's solved prompts: the guides to cache
    # cool-down: no probe before 100 + max(Delta* = 20, cooldown_steps = 0) = 120
    assert auto.cooldown_until == 120
    assert not auto.wants_probe(reading(119)) and auto.wants_probe(reading(120))
    assert decision.to_dict()["delta"] == 20


def test_decide_default_beta_is_mean_response_length():
    auto = AutoNPO(AutoNPOConfig(beta=None, candidate_deltas=[10]))
    decision = auto.decide(100, {"a": 95, "b": 91}, {"a": True, "b": False}, {10: 0.01}, mean_response_length=50.0)
    # V = exp(50 * 0.01) = exp(0.5) = 1.6487213;  S = 0.5 / 1.6487213 = 0.3032653
    assert decision.candidates[0].v_hat == pytest.approx(1.6487213, abs=1e-7)
    assert decision.candidates[0].s_hat == pytest.approx(0.3032653, abs=1e-7)


def test_decide_cooldown_steps_longer_than_delta():
    auto = AutoNPO(AutoNPOConfig(beta=1.0, cooldown_steps=50))
    mistakes, solved = hand_pool()
    decision = auto.decide(100, mistakes, solved, {10: 0.0}, mean_response_length=1.0)
    assert decision.delta == 10
    assert auto.cooldown_until == 150  # 100 + max(10, 50)


def test_decide_failed_confirmation_waits_a_window():
    # q_min rule through decide: Delta = 10 is the argmax (S = 1/4 = 0.25) but Q = 0.25 < q_min = 0.3
    auto = AutoNPO(AutoNPOConfig(beta=100.0, q_min=0.3, window=10))
    mistakes = {"a": 95, "b": 95, "c": 95, "d": 95, "e": 85, "f": 85}
    solved = {"a": True, "b": False, "c": False, "d": False, "e": True, "f": True}
    # Delta = 20: Q = 3/6 = 0.5, V = exp(100 * 0.02) = 7.389, S = 0.0677
    assert auto.decide(100, mistakes, solved, {10: 0.0, 20: 0.02}, mean_response_length=5.0) is None
    assert auto.cooldown_until == 110  # 100 + window


def test_decide_with_no_candidates_raises():
    auto = AutoNPO(AutoNPOConfig())
    with pytest.raises(ValueError, match="kl_by_delta"):
        auto.decide(100, {"a": 95}, {"a": True}, {}, mean_response_length=5.0)
    with pytest.raises(ValueError, match="deltas"):
        auto.probe_prompts(100, {"a": 95}, [], seed=0)


def test_wants_probe_needs_warning_min_step_and_cooldown():
    auto = AutoNPO(AutoNPOConfig(min_step=10))
    assert not auto.wants_probe(reading(9))  # before min_step
    assert auto.wants_probe(reading(10))
    assert not auto.wants_probe(reading(50, warning=False))
    auto.cooldown_until = 60
    assert not auto.wants_probe(reading(59)) and auto.wants_probe(reading(60))


def test_candidate_deltas_need_an_existing_checkpoint():
    auto = AutoNPO(AutoNPOConfig(candidate_deltas=[10, 20, 40, 80]))
    # step 50: 50-10=40 exists, 50-20=30 missing, 50-40=10 exists, 50-80 < 0
    assert auto.candidate_deltas(50, [0, 10, 40, 45]) == [10, 40]
    assert auto.candidate_deltas(50, []) == []


def test_probe_prompts_bounded_seeded_and_windowed():
    auto = AutoNPO(AutoNPOConfig(probe_size=3))
    mistakes = {f"p{i}": 60 + i for i in range(40)}  # failed at steps 60..99
    probe = auto.probe_prompts(100, mistakes, [10, 20], seed=7)  # B_20 = steps [80, 100): p20..p39
    assert len(probe) == 3
    assert all(80 <= mistakes[p] < 100 for p in probe)
    assert probe == sorted(probe) == auto.probe_prompts(100, mistakes, [10, 20], seed=7)
    assert auto.probe_prompts(100, mistakes, [1], seed=0) == ["p39"]  # only p39 failed in [99, 100)


def test_on_rollback_and_state_round_trip():
    cfg = AutoNPOConfig(ema_decay=0.5, window=2)
    auto = AutoNPO(cfg)
    for step in range(5):
        auto.observe(step, 0.1 * step, 1.0)
    auto.cooldown_until = 42
    restored = AutoNPO(cfg)
    restored.load_state_dict(auto.state_dict())
    assert restored.cooldown_until == 42
    assert restored.detector.reading() == auto.detector.reading()
    auto.on_rollback(3)
    assert auto.detector.reading().step == 2
    assert auto.cooldown_until == 42  # the decision state survives the rollback
