"""The paper's prompt templates (HelpSteer3, arXiv 2503.04378, Appendix B) and fescale's own.

The paper prints its templates with newlines removed; fescale's edit layout puts the header and
each feedback on its own line (the joiner is a config value).
"""

FEEDBACK = (
    "Evaluate the response to the previous prompt in terms of how helpful it is overall. "
    "Start the evaluation with the statement - The response is "
    "{not / slightly / partially / mostly / perfectly} helpful. "
    "Then provide a brief explanation of the evaluation in 2 to 10 sentences."
)

EDIT = "Edit the response to the previous prompt based on the following feedback:"
EDIT_FILLER = "<None>"
EDIT_WITHOUT_FEEDBACK = "Edit the response to the previous prompt to improve it."

FEEDBACK_APPLICATION = (
    "Change Summary: {change_summary} Feedback: {feedback} "
    "Does the change summary address issues mentioned in the feedback? Answer only Yes or No"
)

# fescale's logit judge: the score of a candidate is log p(target token | judge prompt).
JUDGE = (
    "Is the response to the previous prompt helpful, correct and complete? Answer only Yes or No."
)

# fescale's generative select: the model sees the conversation and numbered candidates.
SELECT = (
    "Below is a conversation and {n} candidate responses to its last message.\n\n"
    "### Conversation\n{conversation}\n\n### Candidates\n{candidates}\n\n"
    "Which candidate response is the most helpful? Answer with its number only."
)
