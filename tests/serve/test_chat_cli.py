"""`lite-llm chat`: a conversation, turn by turn, on a checkpoint with a ChatML template.

Oracle: the ChatML text of the whole conversation written out by hand (not through the
template renderer), encoded and decoded greedily by the library's own `generate_text`; the
command must print exactly those replies, carry each reply into the next turn, forget them
on /reset, and refuse what does not fit."""

from __future__ import annotations

from typer.testing import CliRunner

from lite_llm.checkpoint import load_checkpoint
from lite_llm.cli import app
from lite_llm.generate import generate_text

runner = CliRunner()
ARGS = ["--temperature", "0", "--max-new-tokens", "12"]


def _chatml(turns: list[tuple[str, str]]) -> str:
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return text + "<|im_start|>assistant\n"


def _reply(loaded, turns: list[tuple[str, str]]) -> str:
    ids = loaded.tokenizer.encode(_chatml(turns))
    return "".join(generate_text(loaded.model, loaded.tokenizer, "", 12, prompt_ids=ids, temperature=0))


def _chat(ckpt, lines: str, *extra: str):
    return runner.invoke(app, ["chat", str(ckpt), *ARGS, *extra], input=lines)


def test_each_reply_is_carried_into_the_next_turn(chat_ckpt):
    loaded = load_checkpoint(chat_ckpt)
    first = _reply(loaded, [("user", "Hello there")])
    second = _reply(loaded, [("user", "Hello there"), ("assistant", first), ("user", "How are you?")])
    alone = _reply(loaded, [("user", "How are you?")])
    assert second != alone  # the history changes the reply, so the test sees whether it was carried
    result = _chat(chat_ckpt, "Hello there\nHow are you?\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{first}\n{second}\n"


def test_a_system_message_opens_the_conversation_and_reset_forgets_the_rest(chat_ckpt):
    loaded = load_checkpoint(chat_ckpt)
    system = ("system", "You are a pirate who speaks only in riddles about the sea.")
    first = _reply(loaded, [system, ("user", "Hello there")])
    assert first != _reply(loaded, [("user", "Hello there")])
    result = _chat(chat_ckpt, "Hello there\n/reset\nHello there\n", "--system", "You are a pirate who speaks only in riddles about the sea.")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{first}\n{first}\n"  # after /reset: the system message and nothing else
    assert "conversation forgotten" in result.stderr


def test_a_turn_over_the_context_is_refused_and_the_conversation_goes_on(chat_ckpt):
    loaded = load_checkpoint(chat_ckpt)
    long = "word " * loaded.model.config.max_seq_len
    result = _chat(chat_ckpt, f"{long}\nHello there\n")
    assert result.exit_code == 0, result.output
    assert "the model's context 128: /reset to start over" in result.stderr
    assert result.stdout == _reply(loaded, [("user", "Hello there")]) + "\n"  # the refused turn is not in the history


def test_a_checkpoint_without_a_chat_template_is_one_sentence(byte_ckpt):
    result = _chat(byte_ckpt, "Hello\n")
    assert result.exit_code == 1
    assert "has no chat template in its tokenizer; use `lite-llm generate` for plain text" in result.output
    assert "Traceback" not in result.output


def test_ctrl_c_stops_a_reply_and_keeps_what_was_shown(chat_ckpt, monkeypatch):
    """Ctrl-C in a reply stops it, and the conversation goes on with what was shown of it."""
    import lite_llm.generate as generation

    loaded = load_checkpoint(chat_ckpt)
    real = generation.generate_text
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(kwargs["prompt_ids"])
        for i, piece in enumerate(real(*args, **kwargs)):
            if len(calls) == 1 and i == 2:
                raise KeyboardInterrupt
            yield piece

    monkeypatch.setattr(generation, "generate_text", interrupted)
    result = _chat(chat_ckpt, "Hello there\nHow are you?\n")
    assert result.exit_code == 0, result.output
    shown = "".join(list(real(loaded.model, loaded.tokenizer, "", 12, prompt_ids=calls[0], temperature=0))[:2])
    assert result.stdout.startswith(shown + "\n")
    assert calls[1] == loaded.tokenizer.encode(_chatml([("user", "Hello there"), ("assistant", shown), ("user", "How are you?")]))


def test_a_conversation_with_the_experts_on_disk_is_the_same_conversation(chat_ckpt):
    """With --hot-budget the experts come from the store, a few at a time: the replies are the
    all-resident ones, and --stats reports the store."""
    lines = "Hello there\nHow are you?\n"
    resident = _chat(chat_ckpt, lines)
    stored = _chat(chat_ckpt, lines, "--hot-budget", "64kB", "--stats")
    assert resident.exit_code == 0 and stored.exit_code == 0, stored.output
    assert stored.stdout == resident.stdout
    assert "expert store: hot" in stored.stderr
