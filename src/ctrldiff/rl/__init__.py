from .finetune import RewardTerm, draw_conditions, finetune
from .objective import ctrl_objective

__all__ = ["RewardTerm", "ctrl_objective", "draw_conditions", "finetune"]
