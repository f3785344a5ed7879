from .config import HunyuanDiTConfig, NotHunyuanDiTError
from .hunyuandit import ComputeOptions, Conditions, HunyuanDiT, LocalAttention, TextConditions, init_random_
from .rope import TokenGrid, rope_table, apply_rope
from .loading import CheckpointError, inspect_source, load_model, load_state_dict, save_checkpoint
