"""The lowest layer: what travels between the layers (`types`), the pure math of the objectives (`algo`) and the
row layouts of a training forward (`packing`). It imports nothing else of grpokit's."""
