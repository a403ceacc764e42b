"""A character-level tokenizer built with `tokenizers` and wrapped as a `transformers` fast tokenizer.

It is the tokenizer of grpokit's offline "small world": every character is one token, so a tiny model
learns arithmetic without having to untangle sub-word merges, and `decode(encode(s)) == s` for any
string made of known characters (spaces and newlines included). It saves with `save_pretrained` and
loads back with `AutoTokenizer.from_pretrained`, so the code paths the tests run are the ones a real
checkpoint goes through.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
BOS_TOKEN = "<bos>"
UNK_TOKEN = "<unk>"
# The order fixes the ids: <pad>=0, <eos>=1, <bos>=2, <unk>=3, then the characters.
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN)

DEFAULT_CHARS = string.digits + "+-=* " + string.ascii_lowercase + string.ascii_uppercase + ".,:;!?'\"()[]/\n"

# `transformers` renders chat templates with trim_blocks=True, which eats a literal newline that
# follows a block tag, so newlines are written as the expression {{ '\n' }}.
# The assistant turn is wrapped in {% generation %} so return_assistant_tokens_mask works, and it ends
# with the EOS token: a rendered conversation then equals prompt-with-generation-prompt + answer + EOS,
# exactly what the sampler produces.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: "
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] }}"
    "{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# Characters the template itself writes; always in the vocabulary so a rendered chat never hits <unk>.
_TEMPLATE_CHARS = "usersystemassistant: \n"


def build_char_tokenizer(
    chars: str | None = None,
    *,
    pad_equals_eos: bool = False,
    padding_side: str = "left",
) -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer.

    Args:
        chars: the alphabet, one token per character (duplicates ignored). None -> DEFAULT_CHARS.
            The characters the chat template writes are appended when missing.
        pad_equals_eos: make the pad token the EOS token (pad_token_id == eos_token_id == 1), the
            setting many real checkpoints ship with; "<pad>" then stays in the vocabulary unused.
        padding_side: "left" (default), because prompts are left-padded for generation.

    Encoding adds no BOS and no EOS; callers append EOS where a completion ends. Unknown characters
    map to "<unk>" (id 3).
    """
    alphabet = dict.fromkeys((DEFAULT_CHARS if chars is None else chars) + _TEMPLATE_CHARS)
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Split before and after every character (newlines too), so each character is its own word.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join tokens with no separator: spaces come back as written
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=EOS_TOKEN if pad_equals_eos else PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side=padding_side,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # would turn "1 ." into "1."
    )
