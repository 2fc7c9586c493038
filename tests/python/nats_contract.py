"""A job published straight to JetStream by nats-py, in the documented schema
(README: "Queue contract"), answered by an ebb worker: the contract is
language-neutral. Run by tests/tests/python_clients.rs with EBB_NATS_URL and
EBB_MODEL_IDENTITY set.
"""
import asyncio
import json
import os
import time
import uuid

import nats


async def main():
    client = await nats.connect(os.environ["EBB_NATS_URL"])
    jetstream = client.jetstream()
    question_id = f"py-{uuid.uuid4()}"
    events = await client.subscribe(f"ebb.answers.{question_id}")
    job = {
        "id": question_id,
        "question": "What is a volcano?",
        "history": [{"role": "system", "content": "Answer in one sentence."}],
        "grade": 7,
        "max_tokens": 10,
        "priority": "normal",
        "model": os.environ["EBB_MODEL_IDENTITY"],
        "enqueued_at_ms": int(time.time() * 1000),
    }
    ack = await jetstream.publish(
        "ebb.questions.normal", json.dumps(job).encode(), headers={"Nats-Msg-Id": question_id}
    )
    assert ack.stream == "EBB_QUESTIONS", ack

    pieces = []
    while True:
        message = await events.next_msg(timeout=60)
        event = json.loads(message.data)
        if event["type"] == "token":
            assert event["seq"] == len(pieces), event
            pieces.append(event["text"])
        else:
            assert event["type"] == "done", event
            assert event["answer"] == "".join(pieces), (event, pieces)
            assert event["finish_reason"] in ("stop", "length"), event
            assert event["timings"]["completion_tokens"] > 0, event
            break
    await client.close()
    print("nats-py contract: ok")


asyncio.run(main())
