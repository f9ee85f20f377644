"""Qwen3's special-token ids and the text forced when a thinking budget runs out (constants only, no imports)."""

ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
THINK_ID = 151667
END_THINK_ID = 151668

THINK_TEXT = "<think>"
END_THINK_TEXT = "</think>"

# Forced into the stream when a thinking budget runs out (Qwen's own recipe; 24 Qwen3 tokens).
STOP_THINKING_TEXT = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on the "
    "thinking directly now.\n</think>\n\n"
)
