"""Names and ids shared by every stage: data preparation, training, export,
serving, clients and tests. Define a name here once; import it elsewhere.

Kept free of heavy imports (no torch, no nvtabular) so clients can use it.
"""

# --- Special ids, as NVTabular's Categorify assigns them -------------------
PAD_ID = 0  # padding inside list features
NULL_ID = 1  # the raw value was null
OOV_ID = 2  # the raw value was not in the fitted vocabulary (or under the frequency threshold)
FIRST_REAL_ID = 3  # encoded ids of real items start here
SPECIAL_IDS = (PAD_ID, NULL_ID, OOV_ID)

# --- Raw interaction columns (DATA/interactions.parquet, ensemble inputs) ---
SESSION_COL = "session_id"
ITEM_COL = "item_id"
CATEGORY_COL = "category"
TIME_COL = "timestamp"  # epoch seconds (real logs only)
# Time-window index of an interaction, 1 = first window. The window is a day, an
# hour or a week (schema.json "window_unit"); the column is named "day" for every
# unit because the name is part of the data on disk: it is an input column of the
# pickled workflow (so it is in workflow.pkl and in schema.json's workflow_sha256,
# which every training run and exported repository records), the session-level
# column "day-first" in the split files, and the folder name below. Renaming it
# would change the bytes of every prepared folder and export and need a reader for
# both names; read WINDOW_COL as "window", whatever its unit.
WINDOW_COL = "day"

# Continuous features of the reference example (given by the synthetic
# generator; derived from the timestamp by workflow ops for real logs).
AGE_COL = "age_days"
WEEKDAY_COL = "weekday_sin"

# --- Session-level columns written by the workflow --------------------------
LIST_SUFFIX = "-list"


def list_col(name: str) -> str:
    """`item_id` -> `item_id-list` (NVTabular Groupby's name_sep='-')."""
    return f"{name}{LIST_SUFFIX}"


ITEM_LIST = list_col(ITEM_COL)  # "item_id-list"
CATEGORY_LIST = list_col(CATEGORY_COL)  # "category-list"
ITEM_COUNT = f"{ITEM_COL}-count"  # number of interactions before truncation
WINDOW_FIRST = f"{WINDOW_COL}-first"  # window index of the session

DEFAULT_MAX_LEN = 20  # keep the LAST N items of a session
DEFAULT_MIN_LEN = 2  # drop sessions shorter than this

SPLITS = ("train", "valid", "test")
RANKS_DIR = "ranks"  # OUT/<this>/window_T.npz: per-session ranks (TrainConfig.save_ranks, bench.paired)
SESSIONS_DIR = "sessions_by_day"  # DATA/<this>/<window>/{train,valid,test}.parquet, any window unit (see WINDOW_COL)
WORKFLOW_DIR = "workflow"
SCHEMA_FILE = "schema.json"
SUMMARY_FILE = "summary.json"
INTERACTIONS_FILE = "interactions.parquet"

# --- Triton model repository ------------------------------------------------
ENSEMBLE_NAME = "session_ranker"
PREPROCESS_MODEL = "preprocess"
TORCH_MODEL = "model"
POSTPROCESS_MODEL = "postprocess"
# The stateful path (issue 18): the server holds each session, a request carries its newest click(s)
STATEFUL_ENSEMBLE_NAME = "session_ranker_stateful"  # requests carry a correlation id (the session) + START/END
STATEFUL_PREPROCESS_MODEL = "preprocess_stateful"  # the sequence-batched first step: keeps the sessions

LENGTHS_TENSOR = "lengths"  # [S] number of real items per padded session
OUT_SESSION_ID = "session_ids"  # [S]; not "session_id": an ensemble output named like an ensemble input makes tritonserver 2.51 loop the step forever
OUT_ITEM_IDS = "item_ids"  # [S, k] raw item ids
OUT_SCORES = "scores"  # [S, k]
OUT_ENCODED_IDS = "encoded_item_ids"  # [S, k] intermediate: encoded ids from the model step
OUT_SESSION_CLICKS = "session_clicks"  # [1] stateful ensemble: clicks the server received since the session's START
# In the message of the status a stateful request gets when the server does not hold its session
# (INVALID_ARGUMENT; Triton's own: "... must specify the START flag on the first request of the
# sequence"; the step's: "... resend its clicks with the START flag ..."): resend with START.
RESEND_WITH_START = "START flag"
