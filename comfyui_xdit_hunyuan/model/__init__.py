from .config import HunyuanDiTConfig, NotHunyuanDiTError
from .hunyuandit import HunyuanDiT, LocalAttention, Conditions, init_random_
from .rope import TokenGrid, rope_table, apply_rope
