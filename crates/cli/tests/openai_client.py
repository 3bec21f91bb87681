"""Drives a SwarmLLM node with the official openai package, unmodified.

Reads OPENAI_BASE_URL and OPENAI_API_KEY like any openai program.
"""
import openai

client = openai.OpenAI()

models = client.models.list()
ids = [m.id for m in models.data]
assert ids, "no models listed"
model = ids[0]

messages = [{"role": "user", "content": "What is the capital of France?"}]
chat = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24)
text = chat.choices[0].message.content
assert text, "empty answer"
assert chat.choices[0].finish_reason in ("stop", "length")
assert chat.usage.completion_tokens > 0
assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

stream = client.chat.completions.create(
    model=model, messages=messages, temperature=0, max_tokens=24, stream=True,
    stream_options={"include_usage": True},
)
parts, finish, usage = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            parts.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
assert "".join(parts) == text, ("stream differs", "".join(parts), text)
assert finish == chat.choices[0].finish_reason
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens

comp = client.completions.create(model=model, prompt="The sky is", max_tokens=8, temperature=0)
assert comp.choices[0].text
assert comp.usage.completion_tokens <= 8

# Structured output as the SDK sends it: the answer parses into the schema.
import json
schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lyon"]}},
          "required": ["city"], "additionalProperties": False}
structured = client.chat.completions.create(
    model=model, messages=messages, temperature=0, max_tokens=32,
    response_format={"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": schema}},
)
answer = json.loads(structured.choices[0].message.content)
assert answer["city"] in ("Paris", "Lyon") and list(answer) == ["city"], answer

# Log-probabilities as the SDK parses them: greedy picks each step's most likely
# token, and the tokens spell the answer; streamed, the same tokens arrive.
lp = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12,
                                    logprobs=True, top_logprobs=3)
content = lp.choices[0].logprobs.content
assert content and "".join(t.token for t in content) == lp.choices[0].message.content
for t in content:
    assert t.logprob <= 0 and len(t.top_logprobs) == 3, t
    assert t.top_logprobs[0].token == t.token and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4, t
    assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    assert bytes(t.bytes).decode("utf-8", "replace") == t.token
streamed = []
for chunk in client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12,
                                            logprobs=True, top_logprobs=3, stream=True):
    for choice in chunk.choices:
        if choice.logprobs and choice.logprobs.content:
            streamed.extend(choice.logprobs.content)
assert [t.token for t in streamed] == [t.token for t in content]
legacy = client.completions.create(model=model, prompt="The sky is", max_tokens=6, temperature=0, logprobs=2)
l = legacy.choices[0].logprobs
assert "".join(l.tokens) == legacy.choices[0].text and len(l.token_logprobs) == len(l.tokens)
assert l.text_offset[0] == 0 and all(len(m) == 2 for m in l.top_logprobs), l
# Several choices streamed: the SDK sorts chunks by their index.
texts = {}
for chunk in client.chat.completions.create(model=model, messages=messages, temperature=1, seed=5, n=2,
                                            max_tokens=8, stream=True):
    for choice in chunk.choices:
        texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
whole = client.chat.completions.create(model=model, messages=messages, temperature=1, seed=5, n=2, max_tokens=8)
assert [texts[0], texts[1]] == [c.message.content for c in whole.choices], (texts, whole.choices)
plain = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=4)
assert plain.choices[0].logprobs is None
try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=2, logprobs=True, top_logprobs=21)
    raise SystemExit("expected UnprocessableEntityError")
except openai.UnprocessableEntityError:
    pass

# Function calling: a call that must be made is one (a grammar makes the answer
# a call with arguments that fit the parameters), streamed as tool_calls deltas,
# and a conversation can carry the call and its result on.
weather_tool = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
time_tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
forced = client.chat.completions.create(
    model=model, messages=ask, temperature=0, max_tokens=48, tools=[weather_tool, time_tool],
    tool_choice={"type": "function", "function": {"name": "get_weather"}})
call = forced.choices[0].message.tool_calls[0]
assert forced.choices[0].finish_reason == "tool_calls" and forced.choices[0].message.content is None, forced
assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_"), call
assert isinstance(json.loads(call.function.arguments)["city"], str), call
required = client.chat.completions.create(model=model, messages=ask, temperature=0, max_tokens=48,
                                          tools=[weather_tool, time_tool], tool_choice="required")
assert required.choices[0].message.tool_calls[0].function.name in ("get_weather", "get_time"), required
name, args, finish = "", "", None
for chunk in client.chat.completions.create(
        model=model, messages=ask, temperature=0, max_tokens=48, tools=[weather_tool, time_tool],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True):
    for choice in chunk.choices:
        for d in choice.delta.tool_calls or []:
            name += d.function.name or ""
            args += d.function.arguments or ""
        finish = choice.finish_reason or finish
assert (name, json.loads(args), finish) == ("get_weather", json.loads(call.function.arguments), "tool_calls")
follow = client.chat.completions.create(model=model, temperature=0, max_tokens=24, tools=[weather_tool], messages=ask + [
    {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
    {"role": "tool", "tool_call_id": call.id, "content": "{\"temperature_c\": 21, \"sky\": \"clear\"}"}])
answer_msg = follow.choices[0].message
assert answer_msg.content or answer_msg.tool_calls, follow
try:
    client.chat.completions.create(model=model, messages=ask, max_tokens=4, tools=[weather_tool],
                                   tool_choice={"type": "function", "function": {"name": "nope"}})
    raise SystemExit("expected UnprocessableEntityError")
except openai.UnprocessableEntityError:
    pass

# The Responses API: create, stream, chain, background with polling, resumed
# streaming and cancel, delete.
import time
first = client.responses.create(model=model, input="What is the capital of France?",
                                instructions="Answer in one sentence.", max_output_tokens=24, temperature=0)
assert first.status in ("completed", "incomplete") and first.output_text, first
assert first.usage.output_tokens > 0 and first.id.startswith("resp_")
assert client.responses.retrieve(first.id).output_text == first.output_text
kinds, deltas = [], []
with client.responses.stream(model=model, input="What is the capital of France?", instructions="Answer in one sentence.",
                             max_output_tokens=24, temperature=0) as s:
    for event in s:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
    final = s.get_final_response()
assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete"), kinds
assert "".join(deltas) == first.output_text == final.output_text, (deltas, first.output_text)
chained = client.responses.create(model=model, input="And of Italy?", previous_response_id=first.id,
                                  max_output_tokens=16, temperature=0)
assert chained.previous_response_id == first.id and chained.output_text, chained
bg = client.responses.create(model=model, input="Count to five.", max_output_tokens=16, temperature=0, background=True)
assert bg.status in ("queued", "in_progress"), bg
deadline = time.time() + 120
while bg.status in ("queued", "in_progress"):
    assert time.time() < deadline, "background response never finished"
    time.sleep(0.1)
    bg = client.responses.retrieve(bg.id)
assert bg.status in ("completed", "incomplete") and bg.output_text, bg
replayed = list(client.responses.retrieve(bg.id, stream=True))
assert [e.sequence_number for e in replayed] == list(range(len(replayed)))
resumed = list(client.responses.retrieve(bg.id, stream=True, starting_after=2))
assert [e.sequence_number for e in resumed] == list(range(3, len(replayed)))
assert "".join(e.delta for e in replayed if e.type == "response.output_text.delta") == bg.output_text
long = client.responses.create(model=model, input="Write a long story.", max_output_tokens=3000, background=True,
                               extra_body={"ignore_eos": True})
cancelled = client.responses.cancel(long.id)
assert cancelled.status == "cancelled", cancelled
deleted = client.responses.delete(first.id)
try:
    client.responses.retrieve(first.id)
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError:
    pass

try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as e:
    assert "no-such-model" in str(e)

bad = openai.OpenAI(api_key="wrong")
try:
    bad.chat.completions.create(model=model, messages=messages, max_tokens=2)
    raise SystemExit("expected AuthenticationError")
except openai.AuthenticationError:
    pass

try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=0)
    raise SystemExit("expected UnprocessableEntityError")
except openai.UnprocessableEntityError:
    pass

print("ALL OK")
