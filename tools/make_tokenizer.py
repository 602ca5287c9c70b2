"""Train the bundled byte-level BPE tokenizer (data/tokenizer/) on the train split of data/corpus/."""
from __future__ import annotations

from pathlib import Path

from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def main() -> None:
    specials = ["<|endoftext|>", "<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(ROOT / "data/corpus/python_docs_train.txt")], vocab_size=8192, min_frequency=2,
              special_tokens=specials, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|pad|>",
                                  additional_special_tokens=specials[2:])
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 2048
    tok.save_pretrained(str(ROOT / "data/tokenizer"))


if __name__ == "__main__":
    main()
