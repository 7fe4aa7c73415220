"""The session model, one concern per file (nanoGPT / nanochat style):

    config.py         ModelConfig: every hyper-parameter, defaults and help
    session_model.py  SessionModel: what the network is
    packing.py        masked-LM masking, several sessions per training row
    xlnet.py          the transformer body (position encodings once per batch, cheap CPU dropout)
    item_memory.py    ItemMemory: count scores added to the logits through learned gates
    memory_inputs.py  its grouped inputs (TargetContext, CountLists, HeadFactors, PackedTargets)
    curves.py         its learned curves of the counts (popularity prior, co-occurrence curve)
    ranking.py        serving top-k: exact, IVF index, two-stage and re-ranking candidates (functions)
    sampled.py        the sampled softmax of large catalogues (functions over tensors)
    losses.py         softmax cross-entropy and gSASRec's gBCE over a set of columns (functions)

`from training.model import SessionModel, ModelConfig, ...` imports the public names.
Imports only torch, transformers and the standard library (no numpy inside anything
that is traced). Checkpoint I/O (`save_checkpoint`, `load_run`) is training.checkpoint.
"""

from training.model.config import (
    LOSS_FNS,
    LOSSES,
    MODEL_FLAGS,
    MODEL_SETTINGS,
    OBJECTIVES,
    RANKINGS,
    SCHEMA_FIELDS,
    ModelConfig,
)
from training.model.item_memory import ItemMemory
from training.model.memory_inputs import CountLists, HeadFactors, PackedTargets, TargetContext
from training.model.packing import MaskedPositions, PackedSessions, mask_positions, pack_sessions
from training.model.ranking import RankIndex, ivf_index, take
from training.model.sampled import SamplerTables, correct_logits, sample_candidates, sampler_tables
from training.model.session_model import SessionModel
from training.model.xlnet import FastDropout

__all__ = [
    "LOSS_FNS",
    "LOSSES",
    "MODEL_FLAGS",
    "MODEL_SETTINGS",
    "OBJECTIVES",
    "RANKINGS",
    "SCHEMA_FIELDS",
    "CountLists",
    "FastDropout",
    "HeadFactors",
    "ItemMemory",
    "MaskedPositions",
    "ModelConfig",
    "PackedSessions",
    "PackedTargets",
    "RankIndex",
    "SamplerTables",
    "SessionModel",
    "TargetContext",
    "correct_logits",
    "ivf_index",
    "mask_positions",
    "pack_sessions",
    "sample_candidates",
    "sampler_tables",
    "take",
]
