from ..conditions import draw_conditions
from .finetune import RewardTerm, finetune
from .objective import ctrl_objective

__all__ = ["RewardTerm", "ctrl_objective", "draw_conditions", "finetune"]
