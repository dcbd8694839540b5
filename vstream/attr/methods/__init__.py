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
"""

# importing a method's module registers it
from vstream.attr.methods import (  # noqa: E402, F401, I001
    input_x_gradient,
    linear_estimator,
    occlusion,
    raw_attention,
)
from vstream.attr.methods.base import (
    METHODS,
    AttributionContext,
    attribute,
    attribute_timed,
    register,
)

__all__ = ["METHODS", "AttributionContext", "attribute", "attribute_timed", "register"]
