from services.proto.npo.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainingMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_MODE_UNSPECIFIED: _ClassVar[TrainingMode]
    TRAINING_MODE_GRPO: _ClassVar[TrainingMode]
    TRAINING_MODE_NPO: _ClassVar[TrainingMode]

class LearnerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEARNER_STATE_UNSPECIFIED: _ClassVar[LearnerState]
    LEARNER_STATE_IDLE: _ClassVar[LearnerState]
    LEARNER_STATE_RUNNING: _ClassVar[LearnerState]
    LEARNER_STATE_PAUSED: _ClassVar[LearnerState]
    LEARNER_STATE_FAILED: _ClassVar[LearnerState]
TRAINING_MODE_UNSPECIFIED: TrainingMode
TRAINING_MODE_GRPO: TrainingMode
TRAINING_MODE_NPO: TrainingMode
LEARNER_STATE_UNSPECIFIED: LearnerState
LEARNER_STATE_IDLE: LearnerState
LEARNER_STATE_RUNNING: LearnerState
LEARNER_STATE_PAUSED: LearnerState
LEARNER_STATE_FAILED: LearnerState

class RunSegmentRequest(_message.Message):
    __slots__ = ("from_step", "length", "mode", "guide_step", "tau_gate", "is_correction", "label")
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    GUIDE_STEP_FIELD_NUMBER: _ClassVar[int]
    TAU_GATE_FIELD_NUMBER: _ClassVar[int]
    IS_CORRECTION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    from_step: int
    length: int
    mode: TrainingMode
    guide_step: int
    tau_gate: float
    is_correction: bool
    label: str
    def __init__(self, from_step: _Optional[int] = ..., length: _Optional[int] = ..., mode: _Optional[_Union[TrainingMode, str]] = ..., guide_step: _Optional[int] = ..., tau_gate: _Optional[float] = ..., is_correction: _Optional[bool] = ..., label: _Optional[str] = ...) -> None: ...

class RunSegmentResponse(_message.Message):
    __slots__ = ("segment_id", "end_step")
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    END_STEP_FIELD_NUMBER: _ClassVar[int]
    segment_id: str
    end_step: int
    def __init__(self, segment_id: _Optional[str] = ..., end_step: _Optional[int] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("to_step",)
    TO_STEP_FIELD_NUMBER: _ClassVar[int]
    to_step: int
    def __init__(self, to_step: _Optional[int] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SaveCheckpointResponse(_message.Message):
    __slots__ = ("checkpoint",)
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    checkpoint: _common_pb2.CheckpointInfo
    def __init__(self, checkpoint: _Optional[_Union[_common_pb2.CheckpointInfo, _Mapping]] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[_common_pb2.CheckpointInfo]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[_common_pb2.CheckpointInfo, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("state", "step", "segment_id", "mode", "guide_step", "segment_end_step", "error", "metrics", "run", "run_steps", "run_dir", "finished")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    GUIDE_STEP_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_END_STEP_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    RUN_STEPS_FIELD_NUMBER: _ClassVar[int]
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    state: LearnerState
    step: int
    segment_id: str
    mode: TrainingMode
    guide_step: int
    segment_end_step: int
    error: str
    metrics: _containers.ScalarMap[str, float]
    run: str
    run_steps: int
    run_dir: str
    finished: bool
    def __init__(self, state: _Optional[_Union[LearnerState, str]] = ..., step: _Optional[int] = ..., segment_id: _Optional[str] = ..., mode: _Optional[_Union[TrainingMode, str]] = ..., guide_step: _Optional[int] = ..., segment_end_step: _Optional[int] = ..., error: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., run: _Optional[str] = ..., run_steps: _Optional[int] = ..., run_dir: _Optional[str] = ..., finished: _Optional[bool] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PauseResponse(_message.Message):
    __slots__ = ("state", "step")
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    state: LearnerState
    step: int
    def __init__(self, state: _Optional[_Union[LearnerState, str]] = ..., step: _Optional[int] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ("state", "step")
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    state: LearnerState
    step: int
    def __init__(self, state: _Optional[_Union[LearnerState, str]] = ..., step: _Optional[int] = ...) -> None: ...
