"""Learning rules.  One module per rule family; each registers its names on import."""
from .base import (FeedbackRule, Rule, available_rules, get_rule, init_feedback, make_rule,
                   register_rule)
from . import bp, direct, fa, sign_symmetry  # noqa: F401  (registration)
from . import direct_learned  # noqa: F401  (registration)
from . import bidirectional, kp, weight_mirror  # noqa: F401  (registration)
from . import target_prop  # noqa: F401  (registration)

__all__ = ["Rule", "FeedbackRule", "register_rule", "get_rule", "available_rules", "make_rule",
           "init_feedback"]
