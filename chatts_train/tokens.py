"""Token ids fixed by the published ChatTS checkpoints (Qwen2.5's vocabulary plus `<ts>` / `<ts/>`)."""

IGNORE_INDEX = -100  # label of positions without a loss
TS_TOKEN_ID = 151665  # `<ts>`: one per encoder patch after expansion
TS_END_TOKEN_ID = 151666  # `<ts/>`: closes a placeholder in the prompt text
