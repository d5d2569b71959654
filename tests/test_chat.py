"""Chat templates (hataori/tokenizer/chat.py) against transformers' apply_chat_template, the independent
reference: the same text, the same ids and the same assistant mask on real Japanese conversations, and
the errors for what cannot be trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import REPO, jcqa_conversations

from hataori.cli import main as hataori_main
from hataori.errors import ConfigError, InputError
from hataori.tokenizer.chat import ChatError, ChatTemplate, check_messages
from hataori.tokenizer.hf import TOKENIZER_CONFIG, write_hf_tokenizer
from hataori.tokenizer.model import Tokenizer

PRESET = REPO / "configs" / "chat" / "ja-chatml.jinja"


def exported(tokenizer: Tokenizer, template: ChatTemplate, folder: Path, **config) -> Path:
    """The tokenizer exported for transformers with ``template`` in its tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    write_hf_tokenizer(tokenizer, folder, model_max_length=4096)
    path = folder / TOKENIZER_CONFIG
    settings = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**settings, "chat_template": template.source, **config}, ensure_ascii=False),
                    encoding="utf-8")
    return folder


def test_ids_and_mask_equal_transformers_apply_chat_template(chat_tokenizer, tmp_path):
    """On 200 conversations (multi-turn, with and without a system turn) the rendered text, the ids and the
    loss mask equal transformers' apply_chat_template(return_assistant_tokens_mask=True) with the exported
    tokenizer; the generation prompt renders alike; the loss tokens decode to the assistant turns."""
    from transformers import AutoTokenizer

    tokenizer, template = Tokenizer(chat_tokenizer), ChatTemplate.load(PRESET)
    template.check_tokenizer(tokenizer)
    hf = AutoTokenizer.from_pretrained(exported(tokenizer, template, tmp_path / "hf"))
    for i, messages in enumerate(jcqa_conversations(200)):
        ours = template.encode(messages, tokenizer, where=f"conversation {i}")
        theirs = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert theirs["input_ids"] == ours.ids, i
        assert theirs["assistant_masks"] == [int(m) for m in ours.mask], i
        assert hf.apply_chat_template(messages, tokenize=False) == template.render(messages, tokenizer)
        prompt = messages[:-1]
        assert hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == \
            template.render(prompt, tokenizer, add_generation_prompt=True)
        expected = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
        assert tokenizer.decode([t for t, m in zip(ours.ids, ours.mask) if m]) == expected


def test_special_token_variables_become_their_ids(chat_tokenizer, tmp_path):
    """A template that writes {{ bos_token }} and {{ eos_token }} gets the BOS and EOS ids, not the spelled
    characters, as transformers gives them where written special tokens are not split. The template is
    written on indented lines without whitespace control and quotes the user's text with tojson, so the
    rendering's trim_blocks, lstrip_blocks and tojson must be transformers' too."""
    from transformers import AutoTokenizer

    path = tmp_path / "eos.jinja"
    path.write_text("{{ bos_token }}\n"
                    "{% for m in messages %}\n"
                    "    {% if m['role'] == 'assistant' %}\n"
                    "{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}\n"
                    "    {% else %}\n"
                    "{{ m['role'] }}: {{ m['content'] | tojson }}\n"
                    "    {% endif %}\n"
                    "{% endfor %}\n", encoding="utf-8")
    tokenizer, template = Tokenizer(chat_tokenizer), ChatTemplate.load(path)
    hf = AutoTokenizer.from_pretrained(exported(tokenizer, template, tmp_path / "hf", split_special_tokens=False))
    for messages in jcqa_conversations(20, seed=1):
        ours = template.encode(messages, tokenizer)
        theirs = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert theirs["input_ids"] == ours.ids
        assert theirs["assistant_masks"] == [int(m) for m in ours.mask]
        assert ours.ids[0] == tokenizer.bos_id and ours.ids.count(tokenizer.eos_id) == len(messages) // 2


def test_template_sources(chat_tokenizer, tmp_path):
    """A .jinja file, a folder with chat_template.jinja, and a tokenizer_config.json give the same template."""
    source = PRESET.read_text(encoding="utf-8")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "chat_template.jinja").write_text(source, encoding="utf-8")
    (tmp_path / TOKENIZER_CONFIG).write_text(json.dumps({"chat_template": source}), encoding="utf-8")
    loaded = [ChatTemplate.load(p) for p in (PRESET, tmp_path / "folder", tmp_path / TOKENIZER_CONFIG)]
    assert {t.sha256 for t in loaded} == {loaded[0].sha256}
    assert loaded[0].special_pieces == ["<|im_end|>", "<|im_start|>"]


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ([{"content": "こんにちは"}], "messages[0] has no 'role'"),
    ([{"role": "user"}], "messages[0] has no 'content'"),
    ([{"role": "bot", "content": "はい"}], "messages[0].role is 'bot'"),
    ([{"role": "user", "content": ["はい"]}], "messages[0].content is"),
    ([{"role": "user", "content": "質問"}], "no assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}],
     "system turn after the first"),
    ([{"role": "user", "content": "a\U0010fff0"}, {"role": "assistant", "content": "b"}], "U+10FFF0"),
])
def test_bad_conversations_are_named(messages, message):
    with pytest.raises(ChatError, match="data.jsonl:7") as err:
        check_messages(messages, "data.jsonl:7")
    assert message in str(err.value)


def test_bad_templates_are_named(chat_tokenizer, jcqa_tokenizer, tmp_path):
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    with pytest.raises(InputError, match="marks no text with {% generation %}"):
        ChatTemplate.load(plain)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% generation %}\n{% for m in messages %}{{ m['content'] }\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"broken.jinja:2: the chat template does not parse"):
        ChatTemplate.load(broken)
    raising = tmp_path / "raising.jinja"
    raising.write_text("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system turn comes first') }}"
                       "{% endif %}{% generation %}{% endgeneration %}", encoding="utf-8")
    tokenizer = Tokenizer(chat_tokenizer)
    with pytest.raises(ChatError, match="data.jsonl:3: the chat template .*raising.jinja fails to render it: a system "
                                        "turn comes first"):
        ChatTemplate.load(raising).encode([{"role": "user", "content": "a"}], tokenizer, where="data.jsonl:3")
    with pytest.raises(InputError, match=r"<\|im_end\|>, <\|im_start\|>, which tokenizer .* does not hold .* --pieces"):
        ChatTemplate.load(PRESET).check_tokenizer(Tokenizer(jcqa_tokenizer))


def test_text_merged_across_a_loss_boundary_is_refused(chat_tokenizer, tmp_path):
    """A template whose generation block starts inside a piece (the tokenizer's "てください") cannot give a
    mask at token boundaries: refused, naming the boundary; with a newline before the block it encodes."""
    tokenizer = Tokenizer(chat_tokenizer)
    word = next(p for p in (tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size))
                if len(p) >= 4 and all("\u3040" <= c <= "\u309f" for c in p))
    messages = [{"role": "user", "content": "質問"}, {"role": "assistant", "content": word[2:]}]
    for prefix, fails in ((word[:2], True), (word[:2] + "\n", False)):
        path = tmp_path / "cut.jinja"
        path.write_text("{% for m in messages %}{% if m['role'] == 'assistant' %}" + prefix
                        + "{% generation %}{{ m['content'] }}{% endgeneration %}{% endif %}{% endfor %}",
                        encoding="utf-8")
        template = ChatTemplate.load(path)
        if fails:
            with pytest.raises(ChatError, match=f"x.jsonl:1: the tokenizer merges text across the boundary .*"
                                                f"{word[:2]}' \\| '{word[2:]}'"):
                template.encode(messages, tokenizer, where="x.jsonl:1")
        else:
            encoded = template.encode(messages, tokenizer)
            assert tokenizer.decode([t for t, m in zip(encoded.ids, encoded.mask) if m]) == word[2:]


def test_extend_adds_special_pieces_and_keeps_every_id(jcqa_tokenizer, chat_tokenizer, en_bpe_tokenizer, tmp_path):
    """--pieces appends user-defined pieces: every base piece keeps its id, the new ones come last and text
    holding them encodes each to its own id; a base with a dummy prefix, or a piece of another kind, is refused."""
    base, extended = Tokenizer(jcqa_tokenizer), Tokenizer(chat_tokenizer)
    assert extended.vocab_size == base.vocab_size + 2
    assert all(base.sp.id_to_piece(i) == extended.sp.id_to_piece(i) for i in range(base.vocab_size))
    start, end = extended.sp.piece_to_id("<|im_start|>"), extended.sp.piece_to_id("<|im_end|>")
    assert (start, end) == (base.vocab_size, base.vocab_size + 1)
    text = "問題です。<|im_start|>答え<|im_end|>\n"
    ids = extended.encode([text])[0]
    assert ids.count(start) == 1 and ids.count(end) == 1 and extended.decode(ids) == text
    plain = "日本の首都は東京です。\n次の問題。"
    assert extended.encode([plain]) == base.encode([plain])
    summary = json.loads((chat_tokenizer / "summary.json").read_text(encoding="utf-8"))
    assert summary["special_pieces"] == {"<|im_start|>": start, "<|im_end|>": end}
    assert hataori_main(["tokenizer", "extend", str(en_bpe_tokenizer), "--pieces", "<|im_start|>,<|im_end|>",
                         "--output", str(tmp_path / "en")]) == 2
    assert not (tmp_path / "en").exists()
    with pytest.raises(InputError, match=r"already holds '</s>' as a piece of another kind"):
        from hataori.tokenizer.extend import ExtendConfig, extend

        extend(ExtendConfig(base=str(jcqa_tokenizer), pieces=["</s>"], output=str(tmp_path / "eos")))
    with pytest.raises(ConfigError, match="pieces"):
        ExtendConfig(base=str(jcqa_tokenizer), pieces=["<|a b|>"], output=str(tmp_path / "space"))
