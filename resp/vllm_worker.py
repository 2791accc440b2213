"""vLLM in its own environment: run by that environment's python (RESP_VLLM_PYTHON), this script serves
`resp.generation.VllmEngine` token ids in, token ids out, over its standard input and output.

vLLM pins its own torch and a transformers below resp's range, so it cannot share resp's environment
(README, "GPU users"). This file imports neither resp nor anything but vllm and the standard
library, so the vLLM environment needs nothing of resp's. Tokenizing, end-of-sequence handling and
decoding stay in resp's process.

Protocol, one JSON object per line: the first line received holds `vllm.LLM`'s keyword arguments, and
the worker answers {"ready": true} once the engine is up; then each request {"prompts": [[token ids]],
"sampling": [{SamplingParams keywords}]} is answered {"token_ids": [[generated ids]]}, in order. An
error is answered {"error": "<one line>"} and ends the worker. vLLM's own logging goes to stderr.
"""

import json
import os
import sys


def main() -> None:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # whatever vLLM prints stays out of the replies

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    try:
        import vllm

        llm = vllm.LLM(**json.loads(sys.stdin.readline()))
        reply({"ready": True})
        for line in sys.stdin:
            request = json.loads(line)
            outputs = llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]],
                                   [vllm.SamplingParams(**kwargs) for kwargs in request["sampling"]])
            reply({"token_ids": [list(output.outputs[0].token_ids) for output in outputs]})
    except Exception as error:  # one line back to resp, which raises it there
        reply({"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"})
        sys.exit(1)


if __name__ == "__main__":
    main()
