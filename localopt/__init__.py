"""localopt: layer-local learning rules for any PyTorch ``nn.Module``.

    import localopt
    localopt.wrap(model, "fa")     # install a rule by hooks; the training loop is unchanged
    localopt.unwrap(model)         # exact backprop again
"""
from . import diagnostics, distributed, optim, rng, rules
from .mechanism import Site, input_grad
from .rules import FeedbackRule, Rule, available_rules, register_rule
from .rules.direct import set_targets
from .wrap import (UNSUPPORTED_TYPES, Summary, Wrapping, hooks_disabled, is_wrapped,
                   reset_feedback, sites, strip_feedback, summary, unwrap, wrap, wrapping)

__version__ = "0.1.0"

__all__ = ["wrap", "unwrap", "wrapping", "Wrapping", "hooks_disabled", "summary", "sites",
           "is_wrapped", "strip_feedback", "reset_feedback",
           "available_rules", "register_rule", "Rule", "FeedbackRule", "Site", "input_grad",
           "set_targets",
           "Summary", "UNSUPPORTED_TYPES", "diagnostics", "distributed", "optim", "rng", "rules"]
