"""Attribution: which image regions each thinking sentence relies on, live.

Read in this order: `regions` (semantic regions -> image tokens), `capture` (attention rows
recorded during generation, no second pass), `spans` (sentences), `ablation` (the one ablation
operator), `labels` and `estimator` (the trained linear map), `worker` (the live session and its
events), `dynamics` (the reliance path), `methods` (every method behind one `attribute` call),
`evaluate` and `bench` (faithfulness and cost).
"""
