"""The agent loop against the scripted backend: geometry, stops, over-turn, samples, context handling."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from PIL import Image

from conftest import gradient_image
from glimpse.agent import AgentLoop
from glimpse.errors import BackendError, ConfigError
from glimpse.images import PixelLimits, fit
from glimpse.models.base import Completion, GenerateParams, ImagePart, Message, TextPart
from glimpse.models.scripted import ScriptedBackend
from glimpse.trajectory import Sample, render_image


def zoom(box, source="original_image", think="looking closer") -> str:
    return f"<think>{think}</think><grounding>{json.dumps({'bbox_2d': box, 'source': source})}</grounding>"


def answer(text: str) -> str:
    return f"<think>I can read it now</think><answer>{text}</answer>"


def run(loop: AgentLoop, sample: Sample, **kw):
    return asyncio.run(loop.run(sample, **kw))


def sample_for(path, question="What is it?") -> Sample:
    return Sample(id="s", images=[str(path)], question=question, answer="42")


def images_sent(request) -> list[ImagePart]:
    return [p for m in request.messages for p in m.parts() if isinstance(p, ImagePart)]


def test_nested_zooms_are_cut_from_the_original_to_the_pixel(make_image):
    path = make_image(1000, 800)
    backend = ScriptedBackend(
        [[zoom([0.25, 0.25, 0.75, 0.75]), zoom([0.5, 0.5, 1.0, 1.0], "observation_1"), answer("42")]]
    )
    (traj,) = run(AgentLoop(backend), sample_for(path))

    assert traj.stop_reason == "answer" and traj.answer == "42" and not traj.over_turn
    assert [t.kind for t in traj.turns] == ["zoom", "zoom", "answer"]
    assert traj.turns[0].crop_box_px == [250, 200, 750, 600]
    assert traj.turns[1].crop_box_px == [500, 400, 750, 600]
    assert traj.turns[1].source_index == 1 and traj.turns[1].observation_index == 2
    assert traj.metrics["zooms"] == 2 and traj.metrics["tool_errors"] == 0

    # What the model was shown is the full-resolution crop, resized: compare the pixels sent with the original.
    original = gradient_image(1000, 800)
    sent = images_sent(backend.requests[2])
    assert len(sent) == 3
    expected = fit(original, PixelLimits(), (500, 400, 750, 600))
    assert sent[2].size == tuple(traj.turns[1].observation_size)
    assert np.array_equal(np.asarray(sent[2].pil()), np.asarray(expected))
    # The crop really is that region: at full resolution its corner pixel encodes (500, 400).
    assert original.getpixel((500, 400)) == render_image(traj, 2, full_resolution=True).getpixel((0, 0))
    # And the record alone recomputes exactly what was shown.
    assert np.array_equal(np.asarray(render_image(traj, 2)), np.asarray(expected))


def test_pixel_and_thousand_conventions_reach_the_same_region(make_image):
    path = make_image(1000, 800)
    for coords, box in (("pixels", [252, 203, 756, 609]), ("thousand", [250, 250, 750, 750])):
        backend = ScriptedBackend([[zoom(box), answer("x")]])
        (traj,) = run(AgentLoop(backend, coords=coords), sample_for(path))
        assert traj.turns[0].crop_box_px == [250, 200, 750, 600], coords


def test_a_mistake_is_shown_to_the_model_and_the_loop_goes_on(make_image):
    path = make_image(1000, 800)
    backend = ScriptedBackend(
        [
            [
                zoom([0.5, 0.5, 0.2, 0.9]),
                zoom([0.1, 0.1, 0.5, 0.5], "observation_4"),
                "<grounding>{not json}</grounding>",
                answer("42"),
            ]
        ]
    )
    (traj,) = run(AgentLoop(backend), sample_for(path))
    assert traj.stop_reason == "answer"
    assert [t.error_kind for t in traj.turns[:3]] == ["inverted_box", "unknown_source", "invalid_json"]
    assert traj.metrics["tool_errors"] == 3
    assert traj.metrics["errors_by_kind"] == {"invalid_json": 1, "inverted_box": 1, "unknown_source": 1}
    last_user = backend.requests[1].messages[-1]
    assert last_user.role == "user" and "x0 must be less than x1" in last_user.text()
    assert "no image called 'observation_4'" in backend.requests[2].messages[-1].text()


def test_turn_cap_with_a_pending_zoom_is_over_turn(make_image):
    path = make_image(1000, 800)
    backend = ScriptedBackend([[zoom([0.1, 0.1, 0.5, 0.5])] * 5])
    (traj,) = run(AgentLoop(backend, max_turns=3), sample_for(path))
    assert traj.stop_reason == "max_turns" and traj.over_turn
    assert len(traj.turns) == 3 and len(backend.requests) == 3
    assert [t.kind for t in traj.turns] == ["zoom", "zoom", "zoom"]
    assert traj.turns[-1].crop_box_px is None  # the last call was never run, but it is recorded as written
    assert traj.turns[-1].call.bbox_2d == [0.1, 0.1, 0.5, 0.5] and traj.turns[-1].call.source == "original_image"


def test_turn_cap_reached_on_an_answer_is_an_answer(make_image):
    backend = ScriptedBackend([[zoom([0.1, 0.1, 0.5, 0.5]), answer("7")]])
    (traj,) = run(AgentLoop(backend, max_turns=2), sample_for(make_image()))
    assert traj.stop_reason == "answer" and not traj.over_turn


def test_turn_cap_on_prose_is_not_over_turn(make_image):
    backend = ScriptedBackend([["<think>hmm</think>"]])
    (traj,) = run(AgentLoop(backend, max_turns=1), sample_for(make_image()))
    assert traj.stop_reason == "no_action" and not traj.over_turn


def test_image_cap(make_image):
    backend = ScriptedBackend([[zoom([0.1, 0.1, 0.5, 0.5]), zoom([0.2, 0.2, 0.6, 0.6]), answer("7")]])
    (traj,) = run(AgentLoop(backend, max_images=2), sample_for(make_image()))
    assert traj.stop_reason == "max_images" and traj.over_turn
    assert traj.metrics["zooms"] == 1


def test_context_full_stops_before_overflow(make_image):
    path = make_image(1000, 800)  # shown at 1008×812: about 1,044 image tokens
    backend = ScriptedBackend([[zoom([0.0, 0.0, 1.0, 1.0]), answer("7")]])
    (traj,) = run(AgentLoop(backend, max_context_tokens=2500, max_new_tokens=1024), sample_for(path))
    assert traj.stop_reason == "context_full" and traj.over_turn
    assert len(traj.turns) == 1 and len(backend.requests) == 1


def test_context_full_from_the_server(make_image):
    from glimpse.errors import ContextLengthError

    def policy(messages, params):
        if len(messages) > 3:
            raise ContextLengthError("This model's maximum context length is 4096 tokens")
        return zoom([0.1, 0.1, 0.5, 0.5])

    (traj,) = run(AgentLoop(ScriptedBackend(policy)), sample_for(make_image()))
    assert traj.stop_reason == "context_full" and traj.over_turn


def test_reply_budget_shrinks_with_the_context(make_image):
    backend = ScriptedBackend([[zoom([0.0, 0.0, 1.0, 1.0]), answer("7")]])
    run(AgentLoop(backend, max_context_tokens=6000, max_new_tokens=4096), sample_for(make_image(1000, 800)))
    budgets = [r.params.max_new_tokens for r in backend.requests]
    assert budgets[0] == 4096 and budgets[1] < 4096


def test_plain_prose_is_no_action(make_image):
    (traj,) = run(AgentLoop(ScriptedBackend([["It is probably a cat."]])), sample_for(make_image()))
    assert traj.stop_reason == "no_action" and traj.answer is None and traj.turns[0].kind == "none"


def test_truncated_reply_is_a_mistake(make_image):
    backend = ScriptedBackend([["<think>" + "very long thinking " * 100, answer("7")]])
    (traj,) = run(AgentLoop(backend, max_new_tokens=50), sample_for(make_image()))
    assert traj.turns[0].error_kind == "truncated" and traj.turns[0].finish_reason == "length"
    assert traj.stop_reason == "answer"


def test_samples_share_one_first_request_and_vote(make_image):
    backend = ScriptedBackend(
        [[zoom([0.1, 0.1, 0.5, 0.5]), answer("A")], [answer("(B)")], [zoom([0.2, 0.2, 0.6, 0.6]), answer("a.")]]
    )
    loop = AgentLoop(backend, seed=10)
    trajs = run(loop, sample_for(make_image()), samples=3)
    assert [t.sample_index for t in trajs] == [0, 1, 2]
    assert [t.answer for t in trajs] == ["A", "(B)", "a."]
    assert backend.requests[0].params.n == 3
    assert sum(1 for r in backend.requests if r.params.n > 1) == 1
    assert {r.params.seed for r in list(backend.requests)[1:]} == {10, 12}
    from glimpse.answers import majority_vote

    vote = majority_vote([t.answer for t in trajs])
    assert vote.answer == "A" and vote.counts == {"a": 2, "b": 1}


def test_keep_images_replaces_old_observations_with_notes(make_image):
    backend = ScriptedBackend(
        [
            [
                zoom([0.0, 0.0, 0.5, 0.5]),
                zoom([0.5, 0.0, 1.0, 0.5]),
                zoom([0.0, 0.5, 0.5, 1.0], "observation_1"),
                answer("7"),
            ]
        ]
    )
    (traj,) = run(AgentLoop(backend, keep_images=1), sample_for(make_image()))
    assert traj.stop_reason == "answer" and traj.settings.keep_images == 1
    last = backend.requests[-1]
    sent = images_sent(last)
    assert len(sent) == 2  # the original and the newest observation
    notes = [
        p.text for m in last.messages for p in m.parts() if isinstance(p, TextPart) and "no longer shown" in p.text
    ]
    assert len(notes) == 2 and "observation_1" in notes[0] and "(0, 0)–(500, 400)" in notes[0]
    # A dropped observation can still be zoomed into: observation_1 was dropped before turn 3 used it.
    assert traj.turns[2].kind == "zoom" and traj.turns[2].crop_box_px == [0, 200, 250, 400]


def test_backend_failure_ends_only_that_trajectory(make_image, tmp_path):
    good = make_image(400, 300, name="good.png")

    def policy(messages, params):
        question = messages[-1].text()
        if "fail" in question:
            raise BackendError("server exploded")
        return answer("7")

    loop = AgentLoop(ScriptedBackend(policy))
    samples = [
        Sample(id="ok", images=[str(good)], question="fine"),
        Sample(id="bad", images=[str(good)], question="please fail"),
        Sample(id="missing", images=[str(tmp_path / "nope.png")], question="fine"),
        Sample(id="none", images=[], question="fine"),
    ]
    results = asyncio.run(loop.run_many(samples, concurrency=2))
    by_id = {r[0].sample.id: r[0] for r in results}
    assert by_id["ok"].stop_reason == "answer"
    assert by_id["bad"].stop_reason == "error" and "server exploded" in by_id["bad"].error
    assert by_id["missing"].stop_reason == "error" and "nope.png: no such file" in by_id["missing"].error
    assert by_id["missing"].image is None and by_id["missing"].turns == []
    assert by_id["none"].stop_reason == "error" and "has no images" in by_id["none"].error


def test_exif_rotated_photo_crops_what_the_model_sees(tmp_path):
    stored = gradient_image(400, 200)
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90° counter-clockwise to view
    path = tmp_path / "rot.png"
    stored.save(path, exif=exif.tobytes())
    backend = ScriptedBackend([[zoom([0.0, 0.0, 1.0, 0.5]), answer("x")]])
    (traj,) = run(AgentLoop(backend), sample_for(path))
    assert (traj.image.width, traj.image.height) == (200, 400)
    assert traj.turns[0].crop_box_px == [0, 0, 200, 200]
    viewed = stored.transpose(Image.Transpose.ROTATE_90)
    crop = render_image(traj, 1, full_resolution=True)
    assert np.array_equal(np.asarray(crop), np.asarray(viewed.crop((0, 0, 200, 200))))


def test_prompt_file_replaces_the_prompts(make_image, tmp_path):
    prompt = tmp_path / "p.yaml"
    prompt.write_text(
        'system: "SYS {coords}"\nobservation: "Obs {observation_turn} after action {action_turn}: {image} go on"\n'
    )
    backend = ScriptedBackend([[zoom([0.1, 0.1, 0.5, 0.5]), answer("7")]])
    (traj,) = run(AgentLoop(backend, prompt_file=str(prompt)), sample_for(make_image()))
    first = backend.requests[0].messages
    assert first[0].role == "system" and first[0].text().startswith("SYS fractions")
    obs = backend.requests[1].messages[-1]
    assert obs.text() == "Obs 1 after action 0:  go on" and len(obs.images()) == 1
    assert traj.settings.prompt.startswith("p.yaml#")


def test_bad_prompt_files_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("observation: no image marker here\n")
    with pytest.raises(ConfigError, match="image marker"):
        AgentLoop(ScriptedBackend([["x"]]), prompt_file=str(bad))
    bad.write_text("sistem: typo\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        AgentLoop(ScriptedBackend([["x"]]), prompt_file=str(bad))


def test_function_calling_protocol(make_image):
    turns = [
        {
            "content": "",
            "tool_calls": [
                {
                    "id": "call_a",
                    "name": "zoom_in",
                    "arguments": {"bbox_2d": [0.25, 0.25, 0.75, 0.75], "source": "original_image"},
                }
            ],
        },
        {"content": "", "tool_calls": [{"id": "call_b", "name": "zoom_in", "arguments": {"bbox_2d": [2, 0, 1, 1]}}]},
        {"content": "The number is <answer>42</answer>."},
    ]
    backend = ScriptedBackend([turns])
    (traj,) = run(AgentLoop(backend, protocol="tools"), sample_for(make_image(1000, 800)))
    assert traj.stop_reason == "answer" and traj.answer == "42"
    assert traj.turns[0].crop_box_px == [250, 200, 750, 600] and traj.turns[0].tool_call_id == "call_a"
    assert traj.turns[1].error_kind == "out_of_range"
    second = backend.requests[1]
    assert second.params.tools and second.params.tools[0]["function"]["name"] == "zoom_in"
    tool_msg, image_msg = second.messages[-2], second.messages[-1]
    assert tool_msg.role == "tool" and tool_msg.tool_call_id == "call_a"
    assert image_msg.role == "user" and len(image_msg.images()) == 1
    error_msg = backend.requests[2].messages[-1]
    assert error_msg.role == "tool" and error_msg.tool_call_id == "call_b" and "outside the image" in error_msg.text()


class TokenBackend:
    """A backend that returns token ids the way vLLM does. Each character is a token and an image is token 7; like a
    chat template, each message is framed by a role header and an end token, and the prompt ends with the
    assistant header."""

    name = "tokens"

    def __init__(self, replies: list[str]):
        self.replies = replies

    @staticmethod
    def encode(messages: list[Message]) -> list[int]:
        ids: list[int] = []
        for m in messages:
            ids += [1000 + ord(m.role[0])]
            for p in m.parts():
                ids += [7] if isinstance(p, ImagePart) else [ord(c) for c in p.text]
            ids += [999]
        return [*ids, 1000 + ord("a")]

    async def generate(self, messages: list[Message], params: GenerateParams) -> list[Completion]:
        turn = sum(m.role == "assistant" for m in messages)
        text = self.replies[turn]
        if "</grounding>" in text:  # the server leaves the stop string out
            text = text[: text.index("</grounding>")]
        prompt = self.encode(messages)
        return [
            Completion(
                text=text,
                prompt_tokens=len(prompt),
                completion_tokens=len(text),
                token_ids=[ord(c) for c in text],
                prompt_token_ids=prompt,
            )
        ]


def test_token_view_marks_sampled_tokens(make_image):
    replies = [zoom([0.1, 0.1, 0.5, 0.5]), answer("7")]
    (traj,) = run(AgentLoop(TokenBackend(replies), return_token_ids=True), sample_for(make_image()))
    view = traj.token_view
    assert view is not None and view.aligned and len(view.ids) == len(view.mask)
    sampled = "".join(chr(i) for i, m in zip(view.ids, view.mask, strict=True) if m == 1)
    assert sampled == replies[0].removesuffix("</grounding>") + replies[1]
    # The closing tag the harness put back, and the observation, are injected tokens.
    injected = "".join(chr(i) if i < 1000 else "|" for i, m in zip(view.ids, view.mask, strict=True) if m == 0)
    assert "</grounding>" in injected
    assert view.ids.count(7) == 2  # the original and one observation


def test_config_errors_raise_with_the_fix():
    backend = ScriptedBackend([["x"]])
    with pytest.raises(ConfigError, match="max_turns must be at least 1"):
        AgentLoop(backend, max_turns=0)
    with pytest.raises(ConfigError, match="unknown protocol"):
        AgentLoop(backend, protocol="xml")
    with pytest.raises(ConfigError, match="coordinate convention"):
        AgentLoop(backend, coords="inches")
    with pytest.raises(ConfigError, match="max_pixels"):
        AgentLoop(backend, min_pixels=100_000, max_pixels=50_000)


def test_a_question_containing_an_image_marker_stays_text(make_image):
    backend = ScriptedBackend([["<answer>x</answer>"]], record=True)
    loop = AgentLoop(backend)
    question = "Is <image> or {image} written on the sign?"
    asyncio.run(loop.run(Sample(id="s", images=[str(make_image())], question=question)))
    user = backend.requests[0].messages[1]
    assert len(user.images()) == 1 and question in user.text()


def two_image_sample(make_image, question="Which one?") -> Sample:
    first, second = make_image(1200, 900, name="first.png"), make_image(900, 1200, name="second.png")
    return Sample(id="two", images=[str(first), str(second)], question=question)


def test_ask_takes_a_list_of_images(make_image):
    from glimpse import ask

    sample = two_image_sample(make_image)
    backend = ScriptedBackend([[zoom([0, 0, 0.5, 0.5], "image_2"), answer("image_2")]])
    result = ask(sample.images, "Which one?", backend=backend)
    (traj,) = result.trajectories
    assert result.answer == "image_2" and traj.sample.id == "first+second"
    assert [o.path for o in traj.originals()] == sample.images and traj.turns[0].original_index == 1
    assert len(images_sent(backend.requests[0])) == 2 and len(images_sent(backend.requests[1])) == 3
    with pytest.raises(ConfigError, match="at least one image"):
        ask([], "?", backend=backend)


def test_max_images_counts_every_original(make_image):
    backend = ScriptedBackend([[zoom([0, 0, 0.5, 0.5], "image_1"), zoom([0, 0, 0.5, 0.5], "image_2"), answer("x")]])
    (traj,) = run(AgentLoop(backend, max_images=3), two_image_sample(make_image))
    assert traj.stop_reason == "max_images" and [t.kind for t in traj.turns] == ["zoom", "zoom"]
    assert traj.turns[0].observation_index == 1 and traj.turns[1].observation_index is None


def test_a_dropped_observation_names_its_own_original(make_image):
    backend = ScriptedBackend(
        [
            [
                zoom([0, 0, 0.5, 0.5], "image_2"),
                zoom([0, 0, 0.5, 0.5], "image_1"),
                zoom([0, 0, 1, 1], "observation_1"),
                answer("x"),
            ]
        ]
    )
    (traj,) = run(AgentLoop(backend, keep_images=1), two_image_sample(make_image))
    parts = [p for m in backend.requests[-1].messages for p in m.parts() if isinstance(p, TextPart)]
    notes = [p.text for p in parts if "no longer shown" in p.text]
    assert "a zoom into image_2 covering pixels (0, 0)–(450, 600) of image_2" in notes[0]
    # Still zoomable by name: a zoom into observation_1 is cut from image_2.
    assert traj.turns[2].original_index == 1 and traj.turns[2].crop_box_px == [0, 0, 450, 600]
    # The originals are never dropped: both are in every request.
    assert all(len(images_sent(r)) >= 2 for r in backend.requests)


def test_the_code_tool_sees_every_original_by_name(make_image):
    code = (
        "print(sorted(images), images['image_2'].size, images['original_image'].size)\n"
        "print(len(images), [im.size for _, im in images.items()][1])\n"
        "show(images['image_2'])"
    )
    backend = ScriptedBackend([[f"<python>\n{code}\n</python>", answer("x")]])
    loop = AgentLoop(backend, code=True, sandbox="process")
    (traj,) = run(loop, two_image_sample(make_image))
    assert (
        "['image_1', 'image_2', 'original_image'] (900, 1200) (1200, 900)\n3 (1200, 900)" in traj.turns[0].code_output
    )
    made = traj.turns[0].made[0]
    assert (made.width, made.height) == (900, 1200) and made.observation_index == 1


def test_counterfactual_crops_of_any_original_are_withheld_and_rendered_so(make_image):
    backend = ScriptedBackend([[zoom([0, 0, 0.5, 0.5], "image_2"), answer("x")]])
    (traj,) = run(AgentLoop(backend, counterfactual="black"), two_image_sample(make_image))
    originals, crop = images_sent(backend.requests[1])[:2], images_sent(backend.requests[1])[2]
    assert np.asarray(crop.image).max() == 0 and all(np.asarray(p.image).max() > 0 for p in originals)
    assert np.array_equal(np.asarray(render_image(traj, 1)), np.asarray(crop.image))
    assert np.array_equal(np.asarray(render_image(traj, 0, original=1)), np.asarray(originals[1].image))


def test_a_policy_that_thinks_for_a_while_does_not_hold_up_the_event_loop():
    """The expert reads images for seconds: a server (glimpse ui, serve) must go on answering meanwhile."""
    import time

    def slow(messages, params):
        time.sleep(0.6)
        return "<answer>x</answer>"

    async def main() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        ticker = asyncio.create_task(tick())
        (reply,) = await ScriptedBackend(slow).generate([Message("user", "?")], GenerateParams())
        ticker.cancel()
        assert reply.text == "<answer>x</answer>"
        return ticks

    assert asyncio.run(main()) >= 5  # the loop ticked while the policy thought
