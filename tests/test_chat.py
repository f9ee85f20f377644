"""Chat rendering against the official Qwen3 template, training segments, completion parsing.

tests/data/qwen3_chat_template.jinja is the hybrid Qwen3 `chat_template` string of the Qwen3
tokenizer_config.json, verbatim (the revision with `message.content is string` guards; public
copies of it and of the April 2025 original, e.g. llama.cpp's models/templates/Qwen-Qwen3-0.6B.jinja,
differ only in those guards). Its sha256 is pinned; it is rendered with jinja2 directly, set up as
transformers' `apply_chat_template` sets it up, as the reference.
"""

import hashlib
import json
from pathlib import Path

import jinja2.ext
import jinja2.sandbox
import pytest
from hypothesis import given, settings, strategies as st

from qwen3_jax.chat import parse_completion, parse_completion_ids, render, render_for_training
from qwen3_jax.ids import END_THINK_ID, IM_END_ID
from qwen3_jax.tokenizer import Tokenizer

TEMPLATE_PATH = Path(__file__).parent / "data" / "qwen3_chat_template.jinja"
TEMPLATE = TEMPLATE_PATH.read_text()
TEMPLATE_SHA256 = "a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather — in °C, for a \"city\" <name>",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "now", "description": "Time.", "parameters": {}}}


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "Why is the sky blue?"}

# (name, messages, tools)
CASES = [
    ("user", [USER], None),
    ("system_user", [SYSTEM, USER], None),
    ("final_answer_no_reasoning", [SYSTEM, USER, {"role": "assistant", "content": "Rayleigh scattering."}], None),
    (
        "reasoning_content",
        [USER, {"role": "assistant", "content": "\nRayleigh.", "reasoning_content": "\nshort waves scatter\n\n"}],
        None,
    ),
    ("inline_think", [USER, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nRayleigh."}], None),
    ("inline_think_no_open_tag", [USER, {"role": "assistant", "content": "hmm</think>Rayleigh."}], None),
    (
        "reasoning_content_wins_over_inline",
        [USER, {"role": "assistant", "content": "<think>a</think>b", "reasoning_content": ""}],
        None,
    ),
    (
        "multi_turn_history_stripped",
        [
            SYSTEM,
            {"role": "user", "content": "2+2? /think"},
            {"role": "assistant", "content": "4", "reasoning_content": "add them"},
            {"role": "user", "content": "and 3+3? /no_think"},
            {"role": "assistant", "content": "<think>\n\n</think>\n\n6"},
            {"role": "user", "content": "and 4+4?"},
            {"role": "assistant", "content": "<think>\ndouble 4\n</think>\n\n8"},
        ],
        None,
    ),
    (
        "multi_turn_ending_with_user",
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "<think>greet</think>\n\nhello"},
            {"role": "user", "content": "bye"},
        ],
        None,
    ),
    ("system_in_the_middle", [USER, {"role": "assistant", "content": "ok"}, SYSTEM, USER], None),
    ("tools_without_system", [USER], [WEATHER_TOOL, TIME_TOOL]),
    ("tools_with_system", [SYSTEM, USER], [WEATHER_TOOL]),
    (
        "tool_call_and_response",
        [
            SYSTEM,
            {"role": "user", "content": "Weather in Paris and Zürich?"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "need the tool",
                "tool_calls": [
                    call("get_weather", {"city": "Paris", "days": 2}),
                    call("get_weather", '{"city": "Zürich"}'),
                ],
            },
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "tool", "content": '{"temp": 17}'},
            {"role": "assistant", "content": "Paris 21 °C, Zürich 17 °C.", "reasoning_content": "read results"},
        ],
        [WEATHER_TOOL],
    ),
    (
        "multi_step_tools",
        [
            {"role": "user", "content": "Plan my day."},
            {"role": "assistant", "content": "Checking time.", "tool_calls": [call("now", {})]},
            {"role": "tool", "content": "09:00"},
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": "morning; check weather",
                "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}],
            },
            {"role": "tool", "content": "rain"},
            {"role": "assistant", "content": "Take an umbrella.", "reasoning_content": "it rains"},
        ],
        [WEATHER_TOOL, TIME_TOOL],
    ),
    (
        "tool_call_without_reasoning_then_answer",
        [
            {"role": "user", "content": "time?"},
            {"role": "assistant", "content": "", "tool_calls": [call("now", {})]},
            {"role": "tool", "content": "09:00"},
            {"role": "assistant", "content": "It is 09:00."},
        ],
        [TIME_TOOL],
    ),
    (
        "user_wrapped_tool_response_is_not_a_query",
        [
            {"role": "user", "content": "time?"},
            {"role": "assistant", "content": "", "reasoning_content": "call it", "tool_calls": [call("now", {})]},
            {"role": "user", "content": "<tool_response>\n09:00\n</tool_response>"},
            {"role": "assistant", "content": "09:00", "reasoning_content": "got it"},
        ],
        [TIME_TOOL],
    ),
    (
        "tool_history_before_new_query",
        [
            {"role": "user", "content": "time?"},
            {"role": "assistant", "content": "", "reasoning_content": "call it", "tool_calls": [call("now", {})]},
            {"role": "tool", "content": "09:00"},
            {"role": "assistant", "content": "09:00", "reasoning_content": "got it"},
            {"role": "user", "content": "thanks, 日本語で？ 😀"},
        ],
        [TIME_TOOL],
    ),
]


def test_template_file_is_the_pinned_one():
    assert hashlib.sha256(TEMPLATE_PATH.read_bytes()).hexdigest() == TEMPLATE_SHA256


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


@pytest.fixture(scope="session")
def official():
    """The official template under transformers' jinja set-up: a sandbox with trimmed blocks,
    loop controls, a tojson that keeps non-ASCII text, and raise_exception."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    template = env.from_string(TEMPLATE)

    def render_official(messages, tools=None, **kwargs):
        return template.render(messages=messages, tools=tools, **kwargs)

    return render_official


@pytest.fixture(scope="session")
def qwen3(qwen3_tokenizer) -> Tokenizer:
    return qwen3_tokenizer


@pytest.mark.parametrize("name,messages,tools", CASES, ids=[c[0] for c in CASES])
def test_render_matches_official_template(official, name, messages, tools):
    assert render(messages, tools=tools) == official(messages, tools)
    assert render(messages, tools=tools, add_generation_prompt=True) == official(
        messages, tools, add_generation_prompt=True
    )
    for thinking in (True, False):
        assert render(messages, tools=tools, add_generation_prompt=True, enable_thinking=thinking) == official(
            messages, tools, add_generation_prompt=True, enable_thinking=thinking
        )


def test_render_known_strings():
    """Hand-checked against the documented format, independent of the template fixture."""
    user = [{"role": "user", "content": "hi /no_think"}]
    assert render(user, add_generation_prompt=True) == (
        "<|im_start|>user\nhi /no_think<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render(user, add_generation_prompt=True, enable_thinking=False) == (
        "<|im_start|>user\nhi /no_think<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    history = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "reasoning_content": "old"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d", "reasoning_content": "new"},
    ]
    assert render(history) == (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
        "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n<think>\nnew\n</think>\n\nd<|im_end|>\n"
    )
    tools_call = [
        {"role": "user", "content": "t?"},
        {"role": "assistant", "content": "", "tool_calls": [call("now", {"tz": "UTC"})]},
        {"role": "tool", "content": "9"},
        {"role": "tool", "content": "10"},
    ]
    assert render(tools_call, tools=[TIME_TOOL]) == (
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "now", "description": "Time.", "parameters": {}}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nt?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "now", "arguments": {"tz": "UTC"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n9\n</tool_response>\n<tool_response>\n10\n</tool_response><|im_end|>\n"
    )


@pytest.mark.parametrize(
    "messages,match",
    [
        ([], "empty"),
        ([{"role": "robot", "content": "x"}], "message 0 has unknown role 'robot'"),
        ([USER, {"role": "assistant"}], "message 1 \\(assistant\\) needs a string 'content'"),
        ([{"role": "user", "content": None}], "message 0 \\(user\\)"),
        ([USER, {"role": "assistant", "content": "x", "reasoning_content": 3}], "message 1"),
        (
            [USER, {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}],
            "message 1 tool call 0",
        ),
        ([USER, "hello"], "message 1 is a str"),
        ("hello", "list of message dicts"),
    ],
)
def test_render_validation(messages, match):
    with pytest.raises(ValueError, match=match):
        render(messages)


TRAINING_CASES = {
    "thinking": (
        [SYSTEM, USER, {"role": "assistant", "content": "Rayleigh.", "reasoning_content": "short waves"}],
        None,
        "<think>\nshort waves\n</think>\n\nRayleigh.<|im_end|>",
    ),
    "non_thinking": (
        [USER, {"role": "assistant", "content": "Rayleigh."}],
        None,
        "<think>\n\n</think>\n\nRayleigh.<|im_end|>",
    ),
    "multi_turn": (
        CASES[7][1],
        None,
        "<think>\ndouble 4\n</think>\n\n8<|im_end|>",
    ),
    "multi_step_tools": (
        CASES[13][1],
        CASES[13][2],
        "<think>\nit rains\n</think>\n\nTake an umbrella.<|im_end|>",
    ),
    "final_tool_call": (
        CASES[12][1][:3],
        CASES[12][2],
        '<think>\nneed the tool\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"days": 2}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n'
        "</tool_call><|im_end|>",
    ),
}


@pytest.mark.parametrize("name", TRAINING_CASES)
def test_render_for_training(qwen3, name):
    messages, tools, target = TRAINING_CASES[name]
    segments = render_for_training(messages, tools=tools)
    assert "".join(text for text, _ in segments) == render(messages, tools=tools)
    assert [text for text, trained in segments if trained] == [target]
    assert segments[-2:] == [(target, True), ("\n", False)]
    assert segments[-3][0].endswith("<|im_start|>assistant\n") and not segments[-3][1]
    # Token-level mask: encoding the segments one by one gives the ids of the whole text.
    ids = [i for text, _ in segments for i in qwen3.encode(text)]
    assert ids == qwen3.encode(render(messages, tools=tools))
    assert qwen3.encode(target)[-1] == IM_END_ID


def test_render_for_training_needs_final_assistant():
    with pytest.raises(ValueError, match="must end with an assistant turn .* its last message is a user message"):
        render_for_training([SYSTEM, USER])


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<think>\nstep 1\n</think>\n\nThe answer.", ("step 1", "The answer.")),
        ("<think>\na</think>b</think>\n\nfinal<|im_end|>", ("a</think>b", "final")),
        ("\n<think>\n\n</think>\n\nquick<|im_end|><|endoftext|>", ("", "quick")),
        ("just an answer\n", ("", "just an answer")),
        ("<think>\nstill thinking", ("still thinking", "")),
        ("reasoning without open tag</think>answer", ("reasoning without open tag", "answer")),
        ("", ("", "")),
    ],
)
def test_parse_completion(text, expected):
    assert parse_completion(text) == expected


def test_parse_completion_ids(qwen3):
    ids = qwen3.encode("<think>\nfirst</think> mid\n</think>\n\nAnswer: 42<|im_end|>")
    assert ids.count(END_THINK_ID) == 2
    assert parse_completion_ids(ids, qwen3) == ("first</think> mid", "Answer: 42")
    assert parse_completion_ids(qwen3.encode("<think>\nunfinished"), qwen3) == ("unfinished", "")
    assert parse_completion_ids(qwen3.encode("no thinking<|im_end|>"), qwen3) == ("", "no thinking")
    # Only the </think> id splits: the same characters spelled with ordinary tokens do not.
    spelled = qwen3.encode("<think>\nx") + qwen3.encode("</") + qwen3.encode("think>") + qwen3.encode("y")
    assert END_THINK_ID not in spelled
    assert parse_completion_ids(spelled, qwen3) == ("x</think>y", "")


# ---- property tests: any input gives a result or a named ValueError ------------------------------

JSON_LEAVES = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
               | st.sampled_from(["<think>", "</think>", "<|im_end|>", "<tool_response>x</tool_response>"]))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
TOOL_CALLS = st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.text(max_size=8), "arguments": st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=2)
     | st.text(max_size=10)})}), min_size=1, max_size=2)
TOOLS = st.none() | st.just([WEATHER_TOOL, TIME_TOOL]) | JSON_VALUES


@st.composite
def conversations(draw) -> object:
    """Valid conversations, then up to two fields (or whole messages) replaced by any JSON value
    or removed; sometimes no list at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON_VALUES)
    messages = []
    for role in draw(st.lists(st.sampled_from(["system", "user", "assistant", "tool"]), min_size=1, max_size=5)):
        message = {"role": role, "content": draw(st.text(max_size=30))}
        if role == "assistant" and draw(st.booleans()):
            message["reasoning_content"] = draw(st.text(max_size=20))
        if role == "assistant" and draw(st.booleans()):
            message["tool_calls"] = draw(TOOL_CALLS)
        messages.append(message)
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, len(messages) - 1))
        field = draw(st.sampled_from(["role", "content", "reasoning_content", "tool_calls", None]))
        if field is None:
            messages[i] = draw(JSON_VALUES)
        elif isinstance(messages[i], dict) and draw(st.booleans()):
            messages[i].pop(field, None)
        elif isinstance(messages[i], dict):
            messages[i][field] = draw(JSON_VALUES)
    return messages


@settings(max_examples=400, deadline=None)
@given(conversations(), TOOLS, st.booleans(), st.booleans())
def test_render_gives_text_or_a_named_value_error(messages, tools, add_generation_prompt, enable_thinking):
    try:
        text = render(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                      enable_thinking=enable_thinking)
    except ValueError as e:
        assert str(e)
        return
    assert isinstance(text, str)
    assert tools is None or all(isinstance(tool, dict) for tool in tools)  # not rendered as garbage
    try:
        segments = render_for_training(messages, tools=tools)
    except ValueError as e:
        assert "must end with an assistant turn" in str(e), e  # the messages themselves render
        return
    assert "".join(t for t, _ in segments) == render(messages, tools=tools)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60) | st.lists(st.sampled_from(["<think>", "</think>", "\n", "a", "<|im_end|>"])).map("".join))
def test_parse_completion_splits_any_text(text):
    thinking, answer = parse_completion(text)
    assert isinstance(thinking, str) and isinstance(answer, str)
    assert len(thinking) + len(answer) <= len(text)


PLAIN = st.text(st.characters(blacklist_characters="<\n", blacklist_categories=("Cs",)), max_size=20)


@settings(max_examples=200, deadline=None)
@given(PLAIN, PLAIN)
def test_parse_completion_recovers_a_rendered_reply(thinking, answer):
    assert parse_completion(f"<think>\n{thinking}\n</think>\n\n{answer}<|im_end|>") == (thinking, answer)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 151_935), max_size=30) | st.lists(st.integers(-(2**40), 2**40), max_size=5))
def test_parse_completion_ids_splits_any_ids_or_names_a_bad_one(qwen3, ids):
    try:
        thinking, answer = parse_completion_ids(ids, qwen3)
    except ValueError as e:
        assert "token ids must be integers in [0, 2**32)" in str(e)
        assert any(not 0 <= i < 2**32 for i in ids)
        return
    assert isinstance(thinking, str) and isinstance(answer, str)
