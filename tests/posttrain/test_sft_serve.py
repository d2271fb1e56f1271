"""An SFT checkpoint is an ordinary one: `serve` answers a chat with what greedy decoding of serve's own chat
template gives on the same weights (issue 13: serve loads SFT/DPO checkpoints as it loads pre-trained ones)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from gigafactory.cli.main import main
from gigafactory.data.chat import ChatTemplate
from gigafactory.data.tokenizer import EOS_ID, plain_text_encoder
from gigafactory.inference.generate import generate_tokens, load_for_inference
from gigafactory.inference.sampling import SamplingParams
from gigafactory.serve.api_server import create_app
from tests.serve.conftest import make_state


def test_serve_answers_an_sft_checkpoint_as_greedy_decoding_of_its_template(pretrained):
    run = pretrained / "sft-serve"
    assert main(["sft", "--checkpoint", str(pretrained / "pre"), "--data", str(pretrained / "chat.jsonl"),
                 f"--logging.run_dir={run}", "--training.steps=2", "--training.eval_every=0", "--training.batch_size=2",
                 "--checkpoint.every=0", "--logging.progress=false", "--logging.tensorboard=false"]) == 0
    loaded = load_for_inference(run)
    messages = [{"role": "user", "content": "Quote verse 2"}]
    template = ChatTemplate(loaded.tokenizer, plain_text_encoder(loaded.tokenizer))
    assert template.special  # the role tokens: the answer ends at [EOS] or a role token, no stop strings
    ids = template.encode(messages)
    role_ids = set(template.role_ids.values())
    greedy = []
    for token in generate_tokens(loaded.model, ids, SamplingParams(temperature=0.0, max_tokens=12)):
        if token == EOS_ID or token in role_ids:
            break
        greedy.append(token)
    with TestClient(create_app(make_state(loaded))) as client:
        answer = client.post("/v1/chat/completions", json={"model": "grok-tiny", "messages": messages,
                                                           "max_tokens": 12, "temperature": 0}).json()
    assert answer["choices"][0]["message"]["content"] == loaded.tokenizer.decode(greedy)
    assert answer["usage"]["prompt_tokens"] == len(ids) and greedy  # a real answer, not an immediate [EOS]
