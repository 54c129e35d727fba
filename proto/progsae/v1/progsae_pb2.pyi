from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]

class EncodeMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODE_MODE_FULL: _ClassVar[EncodeMode]
    ENCODE_MODE_PREFIX: _ClassVar[EncodeMode]

class StreamAxis(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STREAM_AXIS_G: _ClassVar[StreamAxis]
    STREAM_AXIS_K: _ClassVar[StreamAxis]

class PayloadKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYLOAD_RECONSTRUCTION: _ClassVar[PayloadKind]
    PAYLOAD_DELTA: _ClassVar[PayloadKind]
    PAYLOAD_NONE: _ClassVar[PayloadKind]

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_LADDER_DONE: _ClassVar[StopReason]
    STOP_REASON_MAX_GRANULARITY: _ClassVar[StopReason]
    STOP_REASON_DEADLINE: _ClassVar[StopReason]
    STOP_REASON_TARGET_FVU: _ClassVar[StopReason]
    STOP_REASON_TOKEN_TARGET_FVU: _ClassVar[StopReason]
    STOP_REASON_MAX_K: _ClassVar[StopReason]
    STOP_REASON_TOKEN_TARGET_KL: _ClassVar[StopReason]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT64: DType
ENCODE_MODE_FULL: EncodeMode
ENCODE_MODE_PREFIX: EncodeMode
STREAM_AXIS_G: StreamAxis
STREAM_AXIS_K: StreamAxis
PAYLOAD_RECONSTRUCTION: PayloadKind
PAYLOAD_DELTA: PayloadKind
PAYLOAD_NONE: PayloadKind
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_LADDER_DONE: StopReason
STOP_REASON_MAX_GRANULARITY: StopReason
STOP_REASON_DEADLINE: StopReason
STOP_REASON_TARGET_FVU: StopReason
STOP_REASON_TOKEN_TARGET_FVU: StopReason
STOP_REASON_MAX_K: StopReason
STOP_REASON_TOKEN_TARGET_KL: StopReason

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class SparseCodes(_message.Message):
    __slots__ = ("offsets", "indices", "values", "packed_offsets", "packed_indices", "packed_values")
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    PACKED_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    PACKED_INDICES_FIELD_NUMBER: _ClassVar[int]
    PACKED_VALUES_FIELD_NUMBER: _ClassVar[int]
    offsets: _containers.RepeatedScalarFieldContainer[int]
    indices: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    packed_offsets: bytes
    packed_indices: bytes
    packed_values: bytes
    def __init__(self, offsets: _Optional[_Iterable[int]] = ..., indices: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., packed_offsets: _Optional[bytes] = ..., packed_indices: _Optional[bytes] = ..., packed_values: _Optional[bytes] = ...) -> None: ...

class Normalisation(_message.Message):
    __slots__ = ("scale", "folded_into_weights")
    SCALE_FIELD_NUMBER: _ClassVar[int]
    FOLDED_INTO_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    scale: float
    folded_into_weights: bool
    def __init__(self, scale: _Optional[float] = ..., folded_into_weights: _Optional[bool] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("model_id", "activations", "mode", "granularity", "packed_codes")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    PACKED_CODES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    activations: Tensor
    mode: EncodeMode
    granularity: int
    packed_codes: bool
    def __init__(self, model_id: _Optional[str] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ..., mode: _Optional[_Union[EncodeMode, str]] = ..., granularity: _Optional[int] = ..., packed_codes: _Optional[bool] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("model_id", "codes", "normalisation", "mode", "granularity")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    NORMALISATION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    codes: SparseCodes
    normalisation: Normalisation
    mode: EncodeMode
    granularity: int
    def __init__(self, model_id: _Optional[str] = ..., codes: _Optional[_Union[SparseCodes, _Mapping]] = ..., normalisation: _Optional[_Union[Normalisation, _Mapping]] = ..., mode: _Optional[_Union[EncodeMode, str]] = ..., granularity: _Optional[int] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("model_id", "codes", "granularity", "output_dtype", "max_k")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    codes: SparseCodes
    granularity: int
    output_dtype: DType
    max_k: int
    def __init__(self, model_id: _Optional[str] = ..., codes: _Optional[_Union[SparseCodes, _Mapping]] = ..., granularity: _Optional[int] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., max_k: _Optional[int] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("model_id", "granularity", "reconstruction", "l0")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    RECONSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    L0_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    granularity: int
    reconstruction: Tensor
    l0: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model_id: _Optional[str] = ..., granularity: _Optional[int] = ..., reconstruction: _Optional[_Union[Tensor, _Mapping]] = ..., l0: _Optional[_Iterable[int]] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("max_granularity", "deadline_ms", "target_fvu", "token_target_fvu", "max_k", "token_target_kl")
    MAX_GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FVU_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TARGET_FVU_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TARGET_KL_FIELD_NUMBER: _ClassVar[int]
    max_granularity: int
    deadline_ms: int
    target_fvu: float
    token_target_fvu: float
    max_k: int
    token_target_kl: float
    def __init__(self, max_granularity: _Optional[int] = ..., deadline_ms: _Optional[int] = ..., target_fvu: _Optional[float] = ..., token_target_fvu: _Optional[float] = ..., max_k: _Optional[int] = ..., token_target_kl: _Optional[float] = ...) -> None: ...

class TextInput(_message.Message):
    __slots__ = ("text", "max_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    max_tokens: int
    def __init__(self, text: _Optional[str] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class Fidelity(_message.Message):
    __slots__ = ("kl", "predictions")
    KL_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    kl: bool
    predictions: int
    def __init__(self, kl: _Optional[bool] = ..., predictions: _Optional[int] = ...) -> None: ...

class Predictions(_message.Message):
    __slots__ = ("ids", "probs", "tokens")
    IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ..., tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class StreamDecodeRequest(_message.Message):
    __slots__ = ("model_id", "activations", "codes", "text", "budget", "payload", "ladder", "output_dtype", "per_token_l0", "packed_codes", "axis", "k_ladder", "fidelity")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    LADDER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PER_TOKEN_L0_FIELD_NUMBER: _ClassVar[int]
    PACKED_CODES_FIELD_NUMBER: _ClassVar[int]
    AXIS_FIELD_NUMBER: _ClassVar[int]
    K_LADDER_FIELD_NUMBER: _ClassVar[int]
    FIDELITY_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    activations: Tensor
    codes: SparseCodes
    text: TextInput
    budget: Budget
    payload: PayloadKind
    ladder: _containers.RepeatedScalarFieldContainer[int]
    output_dtype: DType
    per_token_l0: bool
    packed_codes: bool
    axis: StreamAxis
    k_ladder: _containers.RepeatedScalarFieldContainer[int]
    fidelity: Fidelity
    def __init__(self, model_id: _Optional[str] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ..., codes: _Optional[_Union[SparseCodes, _Mapping]] = ..., text: _Optional[_Union[TextInput, _Mapping]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., payload: _Optional[_Union[PayloadKind, str]] = ..., ladder: _Optional[_Iterable[int]] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., per_token_l0: _Optional[bool] = ..., packed_codes: _Optional[bool] = ..., axis: _Optional[_Union[StreamAxis, str]] = ..., k_ladder: _Optional[_Iterable[int]] = ..., fidelity: _Optional[_Union[Fidelity, _Mapping]] = ...) -> None: ...

class Rung(_message.Message):
    __slots__ = ("index", "g", "mean_l0", "l0", "tensor", "fvu", "elapsed_ms", "k", "tokens", "refining", "kl", "top1", "predictions", "mean_kl", "clean_predictions")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    G_FIELD_NUMBER: _ClassVar[int]
    MEAN_L0_FIELD_NUMBER: _ClassVar[int]
    L0_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    FVU_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    REFINING_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    TOP1_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MEAN_KL_FIELD_NUMBER: _ClassVar[int]
    CLEAN_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    index: int
    g: int
    mean_l0: float
    l0: _containers.RepeatedScalarFieldContainer[int]
    tensor: Tensor
    fvu: float
    elapsed_ms: float
    k: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    refining: int
    kl: _containers.RepeatedScalarFieldContainer[float]
    top1: _containers.RepeatedScalarFieldContainer[bool]
    predictions: _containers.RepeatedCompositeFieldContainer[Predictions]
    mean_kl: float
    clean_predictions: _containers.RepeatedCompositeFieldContainer[Predictions]
    def __init__(self, index: _Optional[int] = ..., g: _Optional[int] = ..., mean_l0: _Optional[float] = ..., l0: _Optional[_Iterable[int]] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., fvu: _Optional[float] = ..., elapsed_ms: _Optional[float] = ..., k: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., refining: _Optional[int] = ..., kl: _Optional[_Iterable[float]] = ..., top1: _Optional[_Iterable[bool]] = ..., predictions: _Optional[_Iterable[_Union[Predictions, _Mapping]]] = ..., mean_kl: _Optional[float] = ..., clean_predictions: _Optional[_Iterable[_Union[Predictions, _Mapping]]] = ...) -> None: ...

class StreamEnd(_message.Message):
    __slots__ = ("stop_reason", "rungs", "final_g", "final_fvu", "elapsed_ms", "final_k", "token_final_g", "token_final_k", "token_met", "token_kl", "token_top1")
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    RUNGS_FIELD_NUMBER: _ClassVar[int]
    FINAL_G_FIELD_NUMBER: _ClassVar[int]
    FINAL_FVU_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    FINAL_K_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FINAL_G_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FINAL_K_FIELD_NUMBER: _ClassVar[int]
    TOKEN_MET_FIELD_NUMBER: _ClassVar[int]
    TOKEN_KL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TOP1_FIELD_NUMBER: _ClassVar[int]
    stop_reason: StopReason
    rungs: int
    final_g: int
    final_fvu: float
    elapsed_ms: float
    final_k: int
    token_final_g: _containers.RepeatedScalarFieldContainer[int]
    token_final_k: _containers.RepeatedScalarFieldContainer[int]
    token_met: _containers.RepeatedScalarFieldContainer[bool]
    token_kl: _containers.RepeatedScalarFieldContainer[float]
    token_top1: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, stop_reason: _Optional[_Union[StopReason, str]] = ..., rungs: _Optional[int] = ..., final_g: _Optional[int] = ..., final_fvu: _Optional[float] = ..., elapsed_ms: _Optional[float] = ..., final_k: _Optional[int] = ..., token_final_g: _Optional[_Iterable[int]] = ..., token_final_k: _Optional[_Iterable[int]] = ..., token_met: _Optional[_Iterable[bool]] = ..., token_kl: _Optional[_Iterable[float]] = ..., token_top1: _Optional[_Iterable[bool]] = ...) -> None: ...

class StreamDecodeResponse(_message.Message):
    __slots__ = ("header", "rung", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    RUNG_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: StreamHeader
    rung: Rung
    end: StreamEnd
    def __init__(self, header: _Optional[_Union[StreamHeader, _Mapping]] = ..., rung: _Optional[_Union[Rung, _Mapping]] = ..., end: _Optional[_Union[StreamEnd, _Mapping]] = ...) -> None: ...

class StreamHeader(_message.Message):
    __slots__ = ("model_id", "tokens", "ladder", "payload", "codes", "axis", "k_ladder", "token_ids", "token_strings", "text_tokens", "spliced", "language_model", "layer", "fvu_reference_variance")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LADDER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    AXIS_FIELD_NUMBER: _ClassVar[int]
    K_LADDER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_STRINGS_FIELD_NUMBER: _ClassVar[int]
    TEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPLICED_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FVU_REFERENCE_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    tokens: int
    ladder: _containers.RepeatedScalarFieldContainer[int]
    payload: PayloadKind
    codes: SparseCodes
    axis: StreamAxis
    k_ladder: _containers.RepeatedScalarFieldContainer[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    token_strings: _containers.RepeatedScalarFieldContainer[str]
    text_tokens: int
    spliced: _containers.RepeatedScalarFieldContainer[bool]
    language_model: str
    layer: int
    fvu_reference_variance: float
    def __init__(self, model_id: _Optional[str] = ..., tokens: _Optional[int] = ..., ladder: _Optional[_Iterable[int]] = ..., payload: _Optional[_Union[PayloadKind, str]] = ..., codes: _Optional[_Union[SparseCodes, _Mapping]] = ..., axis: _Optional[_Union[StreamAxis, str]] = ..., k_ladder: _Optional[_Iterable[int]] = ..., token_ids: _Optional[_Iterable[int]] = ..., token_strings: _Optional[_Iterable[str]] = ..., text_tokens: _Optional[int] = ..., spliced: _Optional[_Iterable[bool]] = ..., language_model: _Optional[str] = ..., layer: _Optional[int] = ..., fvu_reference_variance: _Optional[float] = ...) -> None: ...

class EncodeTextRequest(_message.Message):
    __slots__ = ("model_id", "text", "max_tokens", "packed_codes")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PACKED_CODES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    text: str
    max_tokens: int
    packed_codes: bool
    def __init__(self, model_id: _Optional[str] = ..., text: _Optional[str] = ..., max_tokens: _Optional[int] = ..., packed_codes: _Optional[bool] = ...) -> None: ...

class EncodeTextResponse(_message.Message):
    __slots__ = ("model_id", "token_ids", "tokens", "codes", "activations", "language_model", "layer", "text_tokens")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    codes: SparseCodes
    activations: Tensor
    language_model: str
    layer: int
    text_tokens: int
    def __init__(self, model_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ..., codes: _Optional[_Union[SparseCodes, _Mapping]] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ..., language_model: _Optional[str] = ..., layer: _Optional[int] = ..., text_tokens: _Optional[int] = ...) -> None: ...

class EncodeTextsRequest(_message.Message):
    __slots__ = ("model_ids", "texts", "max_tokens", "packed_codes")
    MODEL_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PACKED_CODES_FIELD_NUMBER: _ClassVar[int]
    model_ids: _containers.RepeatedScalarFieldContainer[str]
    texts: _containers.RepeatedScalarFieldContainer[str]
    max_tokens: int
    packed_codes: bool
    def __init__(self, model_ids: _Optional[_Iterable[str]] = ..., texts: _Optional[_Iterable[str]] = ..., max_tokens: _Optional[int] = ..., packed_codes: _Optional[bool] = ...) -> None: ...

class EncodeTextsResponse(_message.Message):
    __slots__ = ("results", "lm_ms")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    LM_MS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EncodeTextResponse]
    lm_ms: float
    def __init__(self, results: _Optional[_Iterable[_Union[EncodeTextResponse, _Mapping]]] = ..., lm_ms: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model_id")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model_id: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model_id: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "architecture", "d_in", "d_sae", "k", "ladder", "ordering", "available_orderings", "language_model", "layer", "hook", "normalisation", "training_tokens", "evaluation_json", "text_available", "k_ladder")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    D_IN_FIELD_NUMBER: _ClassVar[int]
    D_SAE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    LADDER_FIELD_NUMBER: _ClassVar[int]
    ORDERING_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_ORDERINGS_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HOOK_FIELD_NUMBER: _ClassVar[int]
    NORMALISATION_FIELD_NUMBER: _ClassVar[int]
    TRAINING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_JSON_FIELD_NUMBER: _ClassVar[int]
    TEXT_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    K_LADDER_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    architecture: str
    d_in: int
    d_sae: int
    k: int
    ladder: _containers.RepeatedScalarFieldContainer[int]
    ordering: str
    available_orderings: _containers.RepeatedScalarFieldContainer[str]
    language_model: str
    layer: int
    hook: str
    normalisation: Normalisation
    training_tokens: int
    evaluation_json: str
    text_available: bool
    k_ladder: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model_id: _Optional[str] = ..., architecture: _Optional[str] = ..., d_in: _Optional[int] = ..., d_sae: _Optional[int] = ..., k: _Optional[int] = ..., ladder: _Optional[_Iterable[int]] = ..., ordering: _Optional[str] = ..., available_orderings: _Optional[_Iterable[str]] = ..., language_model: _Optional[str] = ..., layer: _Optional[int] = ..., hook: _Optional[str] = ..., normalisation: _Optional[_Union[Normalisation, _Mapping]] = ..., training_tokens: _Optional[int] = ..., evaluation_json: _Optional[str] = ..., text_available: _Optional[bool] = ..., k_ladder: _Optional[_Iterable[int]] = ...) -> None: ...

class ServerStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerStats(_message.Message):
    __slots__ = ("replica", "streams_started", "streams_completed", "streams_cancelled", "rungs_computed", "requests", "loaded_models", "work", "loaded_bytes")
    class RequestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class WorkEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    STREAMS_STARTED_FIELD_NUMBER: _ClassVar[int]
    STREAMS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    STREAMS_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    RUNGS_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    LOADED_MODELS_FIELD_NUMBER: _ClassVar[int]
    WORK_FIELD_NUMBER: _ClassVar[int]
    LOADED_BYTES_FIELD_NUMBER: _ClassVar[int]
    replica: str
    streams_started: int
    streams_completed: int
    streams_cancelled: int
    rungs_computed: int
    requests: _containers.ScalarMap[str, int]
    loaded_models: _containers.RepeatedScalarFieldContainer[str]
    work: _containers.ScalarMap[str, int]
    loaded_bytes: int
    def __init__(self, replica: _Optional[str] = ..., streams_started: _Optional[int] = ..., streams_completed: _Optional[int] = ..., streams_cancelled: _Optional[int] = ..., rungs_computed: _Optional[int] = ..., requests: _Optional[_Mapping[str, int]] = ..., loaded_models: _Optional[_Iterable[str]] = ..., work: _Optional[_Mapping[str, int]] = ..., loaded_bytes: _Optional[int] = ...) -> None: ...
