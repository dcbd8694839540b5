"""Attribution methods behind one call: `attribute(method, ctx) -> (n_spans, K) region scores`.

Every method answers the same question as vSTREAM's estimator: how much does thinking span S
rely on image region k, in units of the ablation effect (the drop of the span's teacher-forced
log-prob sum when the region is removed; positive = the span relied on it). A subset's effect is
predicted as the sum of its regions' scores, which is how `vstream.attr.evaluate` scores them all.

    ctx = AttributionContext(vlm, inputs, generated_ids, spans, assignment,
                             token_attn=rows, estimator=est)
    scores = attribute("occlusion", ctx)          # np.ndarray (len(spans), K)

Methods (Captum style: one file each, registered by name in `METHODS`):

* ``vstream`` (`linear_estimator.py`): the trained linear estimator on the span's attention features
  (`capture.region_features`: per (layer, head), mean over span tokens of the attention mass on
  the region); recorded during generation, so no extra forward or backward pass.
* ``raw_attention``: the same features summed over layers and heads, no estimator.
* ``input_x_gradient``: gradient of the span's teacher-forced log-prob sum w.r.t. the LLM's
  input embeddings at the image positions (after the vision tower, i.e. what the language model
  receives as `inputs_embeds`), dotted with those embeddings per token, summed per region.
  One forward over prompt + trace, then one backward per span. x . grad is the first-order
  estimate of log p(x) - log p(x with the region's embeddings zeroed), so its sign matches the
  ablation effect. On Qwen3-VL the DeepStack features injected inside the decoder are held fixed.
* ``occlusion``: leave-one-region-out: the measured effect of ablating region k alone, with the
  one ablation operator (`vstream.attr.ablation.ablation_effects`, K one-region masks, batched).
* ``tam``: Token Activation Maps (Li et al. 2025): per generated token, the relu logit of that
  token read at the image tokens' last hidden states, minus the estimated interference of
  earlier context tokens (ECI), min-max normalised and rank-Gaussian filtered; summed over the
  span's tokens and the region's image tokens. Non-negative, not in nats. One forward, no grad.
* ``attnlrp``: AttnLRP (Achtibat et al. 2024): layer-wise relevance of the image tokens' input
  embeddings for the span's log-prob sum, in the gradient x input form (rules on norms,
  activations, the gated product and attention as backward-pass changes, hooked on this model
  only), summed per region. One forward, one backward per span, like input_x_gradient.

`teacher_forced.py` holds the one teacher-forced forward (with grad at the LLM input embeddings,
or the last hidden states) that input_x_gradient, attnlrp and tam share.
"""

# importing a method's module registers it
from vstream.attr.methods import (  # noqa: E402, F401, I001
    attnlrp,
    input_x_gradient,
    linear_estimator,
    occlusion,
    raw_attention,
    tam,
)
from vstream.attr.methods.base import (
    METHODS,
    AttributionContext,
    attribute,
    attribute_timed,
    register,
)

__all__ = ["METHODS", "AttributionContext", "attribute", "attribute_timed", "register"]
