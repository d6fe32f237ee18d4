"""An LLM backend over OpenAI-compatible HTTP servers (vLLM, SGLang, llama.cpp), token-exact on vLLM.

Token path (`complete_tokens`): POST /v1/completions with the prompt as token ids, `return_token_ids`
and `logprobs: 0` (the sampled token's logprob only); vLLM answers with `choices[0].token_ids` (the
generated ids, EOS included when the model ended its turn) and `choices[0].logprobs.token_logprobs`
(one per id). No `stop` strings are sent: a stop string cuts the text but not the ids, so the turn ends
only at the model's EOS or at `max_tokens`. Chat path (`complete_chat`): POST /v1/chat/completions.

Built on httpx rather than the `openai` client: the token path lives in vLLM's extra request and
response fields, which the typed client only passes through as untyped extras, and retries and
spreading over several servers are done here (least in-flight first), so the client's own retry layer
would only be switched off. One `httpx.AsyncClient` per backend, pooled for hundreds of connections.

Routing: `route(key)` hands out a per-trajectory view of the backend. With `sticky=True` (the default) a
view sends its first request to the least busy healthy server and every later one to the same server, so
that the server finds the conversation so far in its prefix cache; if that server fails, the view moves
to a healthy one and stays there. With `sticky=False` every request goes to the least busy server.

Failures: connection trouble, 5xx and 429 are retried (`max_retries`, with backoff). After each one the
server's /v1/models is checked: a server that does not answer it is gone, and once every server is gone,
requests fail at once instead of retrying. A 200 whose body is not the OpenAI shape is not retried: its
request fails with one line saying what came back.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from mathtool.errors import ContextExceeded, ServerError
from mathtool.llm.base import Completion, SamplingParams

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0  # also the health check's, after a failed request
_MAX_CONNECTIONS = 512
_BACKOFF_CAP_S = 8.0
_START_HINT = "start one with `mathtool serve` or fix --base-url"


@dataclass
class _Endpoint:
    root: str  # server root, without /v1
    in_flight: int = 0
    failures: int = 0  # transient failures in a row
    down_until: float = 0.0  # monotonic time before which a failed endpoint is avoided
    up: bool = True  # False when /v1/models did not answer after a failure: the server is gone
    checked_at: float = 0.0  # monotonic time the last health check began
    check_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # requests failing together share one check


class _TransientError(Exception):
    """A failure worth retrying: connection trouble, 5xx, 429."""


class _MalformedBody(ServerError):
    """A 200 from a completions endpoint whose body is not the OpenAI shape; not retried."""


def server_root(base_url: str) -> str:
    """`http://host:port` from a base URL given with or without the trailing /v1."""
    url = base_url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ServerError(f"base URL {base_url!r} is not an http(s) URL; pass e.g. http://127.0.0.1:30000/v1")
    return url.removesuffix("/v1")


class OpenAIBackend:
    """`LLMBackend` over one or more OpenAI-compatible servers serving the same model.

    Build it with `await OpenAIBackend.connect(urls)`, which checks the servers and detects the model,
    its context length and whether the token-exact path works; or construct it directly when those are
    known. Use as `async with` or call `aclose()`.
    """

    def __init__(
        self,
        base_urls: Sequence[str],
        model: str = "",
        *,
        supports_token_ids: bool = False,
        max_model_len: int | None = None,
        request_timeout_s: float = 600.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        api_key: str | None = None,
        extra_body: dict[str, Any] | None = None,
        sticky: bool = True,
    ) -> None:
        if not base_urls:
            raise ServerError("no model server URL given; pass --base-url or let the embedded server start")
        self._endpoints = [_Endpoint(server_root(url)) for url in base_urls]
        self.model = model
        self.supports_token_ids = supports_token_ids
        self.max_model_len = max_model_len
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.sticky = sticky  # keep each routed trajectory on the server of its first request
        self.server_kind = ""  # /v1/models' owned_by: vllm, sglang, ... (set by probe)
        self.extra_body = dict(extra_body or {})  # server-specific fields added to every generation request
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(request_timeout_s, connect=PROBE_TIMEOUT_S),
            limits=httpx.Limits(max_connections=_MAX_CONNECTIONS, max_keepalive_connections=_MAX_CONNECTIONS),
            headers=headers,
        )

    @classmethod
    async def connect(cls, base_urls: Sequence[str], model: str | None = None, **kwargs: Any) -> OpenAIBackend:
        """Construct and `probe()`; raises a one-line ServerError if a server cannot be used."""
        backend = cls(base_urls, model or "", **kwargs)
        try:
            await backend.probe()
        except BaseException:
            await backend.aclose()
            raise
        return backend

    async def __aenter__(self) -> OpenAIBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    # --- probing ---------------------------------------------------------------------------------

    async def probe(self) -> None:
        """Check every server answers /v1/models; set `model` (first served one unless given),
        `max_model_len` (smallest reported) and `supports_token_ids`."""
        cards = [await self._models(endpoint.root) for endpoint in self._endpoints]
        for endpoint, served in zip(self._endpoints, cards, strict=True):
            self._check_model(endpoint.root, served)
        lengths = [
            card["max_model_len"]
            for served in cards
            for card in served
            if card.get("id") == self.model and isinstance(card.get("max_model_len"), int)
        ]
        self.max_model_len = min(lengths) if lengths else self.max_model_len
        self.supports_token_ids = await self._probe_token_ids()
        logger.info(
            "model server(s) %s: model %s, context %s, token-exact: %s",
            ", ".join(e.root for e in self._endpoints),
            self.model,
            self.max_model_len,
            self.supports_token_ids,
        )

    async def _models(self, root: str) -> list[dict[str, Any]]:
        try:
            response = await self._client.get(root + "/v1/models", timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach a model server at {root} ({_describe(exc)}); {_START_HINT}") from exc
        if response.status_code != 200:
            raise ServerError(
                f"{root}/v1/models answered HTTP {response.status_code} ({_error_text(response)}); "
                f"is this an OpenAI-compatible server? {_START_HINT}"
            )
        body = _json(response)
        served = body.get("data") if isinstance(body, dict) else None
        if not isinstance(served, list) or not all(isinstance(card, dict) for card in served):
            raise ServerError(
                f"{root}/v1/models answered 200 with something other than an OpenAI model list "
                f"({_shortened(response.text)}); is this an OpenAI-compatible server? {_START_HINT}"
            )
        return served

    def _check_model(self, root: str, served: list[dict[str, Any]]) -> None:
        names = [str(card.get("id")) for card in served]
        self.server_kind = str(served[0].get("owned_by", "")) if served else ""
        if not self.model and names:
            self.model = names[0]
        if not self.model:
            raise ServerError(f"{root} lists no models; pass --model")
        if names and self.model not in names:
            raise ServerError(
                f"{root} does not serve model {self.model!r} (it serves {', '.join(names)}); fix --model or --base-url"
            )

    async def _probe_token_ids(self) -> bool:
        """True when /v1/completions takes a token-id prompt and returns one id and one logprob per
        generated token (vLLM); False for servers that reject or ignore those fields."""
        payload = {
            "model": self.model,
            "prompt": [0, 0],
            "max_tokens": 2,
            "temperature": 0.0,
            "logprobs": 0,
            "return_token_ids": True,
        }
        try:
            body = await self._post("/v1/completions", payload)
        except _MalformedBody:
            raise
        except ServerError as exc:
            logger.info("token-id completions unsupported (%s); using chat completions", exc)
            return False
        tokens = _token_fields(body["choices"][0])
        generated = (body.get("usage") or {}).get("completion_tokens")
        return tokens is not None and 0 < len(tokens[0]) == generated

    # --- generation ------------------------------------------------------------------------------

    def route(self, key: Hashable) -> RoutedBackend:
        """A view of this backend for one trajectory (`key`, e.g. its (problem id, sample)): with `sticky`,
        all of its requests go to one server while that server stays healthy."""
        return RoutedBackend(self, key)

    async def complete_tokens(self, prompt_ids: list[int], params: SamplingParams,
                              route: _Route | None = None) -> Completion:
        """Continue `prompt_ids`. `max_tokens` is clamped to the context left (when known); with no
        room left this returns an empty completion with finish_reason "length"."""
        room = params.max_tokens if self.max_model_len is None else self.max_model_len - len(prompt_ids)
        max_tokens = min(params.max_tokens, room)
        if max_tokens < 1:
            return Completion(text="", finish_reason="length", token_ids=[], logprobs=[])
        payload = {
            "model": self.model,
            "prompt": prompt_ids,
            "logprobs": 0,
            "return_token_ids": True,
            **self._sampling(params, max_tokens),
        }
        if params.stop:  # keep the stop string, so that the text is what the token ids decode to
            payload["include_stop_str_in_output"] = True
        choice = (await self._post("/v1/completions", payload, route))["choices"][0]
        tokens = _token_fields(choice)
        if tokens is None:
            raise ServerError(
                "the server returned no token ids, or not one numeric logprob per integer id; "
                "serve the model with vLLM, or use the chat path"
            )
        return Completion(text=choice["text"], finish_reason=_finish_reason(choice), token_ids=tokens[0],
                          logprobs=tokens[1])

    async def complete_chat(self, messages: list[dict], params: SamplingParams, tools: list[dict] | None = None,
                            template_kwargs: dict | None = None, route: _Route | None = None) -> Completion:
        """Chat completions. With `tools`, a server run with a tool-call parser (vLLM `--enable-auto-tool-choice
        --tool-call-parser hermes`) answers with `message.tool_calls`; others leave the calls in the text."""
        payload = {"model": self.model, "messages": messages, **self._sampling(params, params.max_tokens)}
        if tools:
            payload["tools"] = tools
        if template_kwargs:
            payload["chat_template_kwargs"] = template_kwargs
        body = await self._post("/v1/chat/completions", payload, route)
        choice = body["choices"][0]
        message = choice["message"]
        return Completion(
            text=message.get("content") or "",
            finish_reason=_finish_reason(choice),
            usage_tokens=int((body.get("usage") or {}).get("completion_tokens") or 0),
            tool_calls=message.get("tool_calls") or None,
        )

    def _sampling(self, params: SamplingParams, max_tokens: int) -> dict[str, Any]:
        """Every sampling field, so that none falls back to the model's generation_config on the server.
        top_k 0 is "the whole vocabulary" for vLLM and llama.cpp; SGLang spells it -1."""
        top_k = params.top_k if params.top_k > 0 else (-1 if self.server_kind == "sglang" else 0)
        fields: dict[str, Any] = {"max_tokens": max_tokens, "temperature": params.temperature,
                                  "top_p": params.top_p, "top_k": top_k, "min_p": params.min_p, **self.extra_body}
        if params.seed is not None:
            fields["seed"] = params.seed
        if params.stop:
            fields["stop"] = list(params.stop)
        return fields

    # --- transport -------------------------------------------------------------------------------

    async def _post(self, path: str, payload: dict[str, Any], route: _Route | None = None) -> dict[str, Any]:
        """POST to the route's server (sticky), else to the least busy healthy server. A transient failure
        takes that server out of rotation for a backoff that doubles with each failure in a row; the request
        retries at once on another server (which the route then keeps), or waits for the first to come
        back when all are out, or fails at once when every server is gone (see `_check_after_failure`)."""
        error = ""
        for attempt in range(self.max_retries + 1):
            self._fail_if_all_gone(error)
            if error:
                logger.warning("%s failed (attempt %d/%d): %s", path, attempt, self.max_retries + 1, error)
            endpoint = self._pick(route)
            logger.debug("%s%s for %s", endpoint.root, path, route.key if route else None)
            endpoint.in_flight += 1  # counted from the pick, so that requests picking together spread out
            try:
                await asyncio.sleep(max(0.0, endpoint.down_until - time.monotonic()))
                body = await self._post_once(endpoint, path, payload)
            except _TransientError as exc:
                error = str(exc)
            else:
                endpoint.failures, endpoint.down_until, endpoint.up = 0, 0.0, True
                return body
            finally:
                endpoint.in_flight -= 1
            await self._check_after_failure(endpoint)
        raise ServerError(
            f"model server request {path} failed after {self.max_retries + 1} attempts "
            f"(last: {error}); check the server is running (see its log) and restart it"
        )

    async def _check_after_failure(self, endpoint: _Endpoint) -> None:
        """Whether a server that just failed a request still answers /v1/models (one check for the requests
        that failed together; a dead server refuses at once); then out of rotation for its backoff."""
        failed_at = time.monotonic()
        async with endpoint.check_lock:
            if endpoint.checked_at <= failed_at:
                endpoint.checked_at = time.monotonic()
                endpoint.up = await self._answers_models(endpoint.root)
                if not endpoint.up:
                    logger.info("%s does not answer /v1/models: taken to be gone", endpoint.root)
        self._mark_failed(endpoint)

    async def _answers_models(self, root: str) -> bool:
        try:
            response = await self._client.get(root + "/v1/models", timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def _fail_if_all_gone(self, error: str) -> None:
        """Raise ServerError when every server is gone: failed, did not answer /v1/models, still in its backoff
        (after which a request tries it again, so that a server that comes back is used)."""
        now = time.monotonic()
        if all(not endpoint.up and endpoint.down_until > now for endpoint in self._endpoints):
            roots = ", ".join(endpoint.root for endpoint in self._endpoints)
            gone = "the model server is gone" if len(self._endpoints) == 1 else "every model server is gone"
            last = f" after {error}" if error else ""
            raise ServerError(f"{gone}: {roots} does not answer /v1/models{last}")

    def _pick(self, route: _Route | None = None) -> _Endpoint:
        """A sticky route's server while it is healthy; else the least busy one, which a sticky route keeps."""
        now = time.monotonic()
        if route is None or not self.sticky:
            return self._least_busy(now)
        if route.endpoint is None or route.endpoint.down_until > now:
            endpoint = self._least_busy(now)
            if route.endpoint is not None:
                logger.info("trajectory %s moves from %s to %s", route.key, route.endpoint.root, endpoint.root)
            route.endpoint = endpoint
        return route.endpoint

    def _least_busy(self, now: float) -> _Endpoint:
        """Healthy servers first, least in flight; when all are out, the one back soonest."""
        return min(self._endpoints, key=lambda endpoint: (max(endpoint.down_until, now), endpoint.in_flight))

    def _mark_failed(self, endpoint: _Endpoint) -> None:
        now = time.monotonic()
        if endpoint.down_until > now:  # one more failure of the same outage (concurrent requests)
            return
        endpoint.failures += 1
        backoff = min(_BACKOFF_CAP_S, self.backoff_s * 2 ** (endpoint.failures - 1))
        endpoint.down_until = now + backoff * random.uniform(0.5, 1.0)

    async def _post_once(self, endpoint: _Endpoint, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        url = endpoint.root + path
        try:
            response = await self._client.post(url, json=payload)
        except httpx.TransportError as exc:
            raise _TransientError(f"{endpoint.root}: {_describe(exc)}") from exc
        if response.status_code == 200:
            body = _completion_body(url, response)
            reason = body["choices"][0].get("finish_reason")
            if reason in _ABORTED:  # the server gave up on this request (vLLM: aborted, engine error)
                raise _TransientError(f"{url} ended the generation with finish_reason={reason!r}")
            return body
        message = f"{url} answered HTTP {response.status_code}: {_error_text(response)}"
        if response.status_code == 429 or response.status_code >= 500:
            raise _TransientError(message)
        if response.status_code == 400 and _CONTEXT_EXCEEDED.search(message):
            raise ContextExceeded(message)
        raise ServerError(message)


@dataclass
class _Route:
    """One trajectory's routing state: its key and the server it keeps (set at its first request)."""

    key: Hashable
    endpoint: _Endpoint | None = None


class RoutedBackend:
    """One trajectory's view of an `OpenAIBackend` (an `LLMBackend`): its requests carry its route."""

    def __init__(self, backend: OpenAIBackend, key: Hashable) -> None:
        self.backend = backend
        self._route = _Route(key)

    @property
    def model(self) -> str:
        return self.backend.model

    @property
    def supports_token_ids(self) -> bool:
        return self.backend.supports_token_ids

    @property
    def server(self) -> str | None:
        """The root of the server this trajectory keeps (sticky), once it has sent a request."""
        return self._route.endpoint.root if self._route.endpoint else None

    async def complete_tokens(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        return await self.backend.complete_tokens(prompt_ids, params, self._route)

    async def complete_chat(self, messages: list[dict], params: SamplingParams, tools: list[dict] | None = None,
                            template_kwargs: dict | None = None) -> Completion:
        return await self.backend.complete_chat(messages, params, tools, template_kwargs, self._route)


_ABORTED = ("abort", "error")
# How vLLM ("maximum context length"), SGLang ("longer than the model's context length") and llama.cpp ("exceeds
# the available context size") refuse a prompt that does not fit
_CONTEXT_EXCEEDED = re.compile(r"context (length|size|window)", re.IGNORECASE)


def _finish_reason(choice: dict[str, Any]) -> str:
    """ "length" when max_tokens was reached, "stop" when the model ended its turn."""
    reason = choice.get("finish_reason")
    if reason == "length":
        return "length"
    if reason in ("stop", "tool_calls", "eos"):
        return "stop"
    raise ServerError(f"the server ended a generation with finish_reason={reason!r} (aborted?); check the server log")


def _describe(exc: httpx.HTTPError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _completion_body(url: str, response: httpx.Response) -> dict[str, Any]:
    """The JSON body of a 200 from /v1/completions or /v1/chat/completions, checked to be the OpenAI shape
    as far as this backend reads it; else a one-line `_MalformedBody` saying what came back."""
    body = _json(response)
    field_name, kind = ("message", dict) if url.endswith("/chat/completions") else ("text", str)
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(body, dict):
        problem = "something other than a JSON object"
    elif not isinstance(choices, list) or not choices:
        problem = "no choices"
    elif not isinstance(choices[0], dict) or not isinstance(choices[0].get(field_name), kind):
        problem = f"a first choice without its {field_name}"
    elif kind is dict and not isinstance(choices[0][field_name].get("content") or "", str):
        problem = "a message whose content is not text"
    elif not isinstance(body.get("usage") or {}, dict):
        problem = "a usage that is not an object"
    else:
        return body
    raise _MalformedBody(f"{url} answered 200 with {problem}: {_shortened(response.text)}")


def _json(response: httpx.Response) -> Any:
    """The body parsed as JSON; None when it is not JSON."""
    try:
        return response.json()
    except ValueError:
        return None


def _token_fields(choice: dict[str, Any]) -> tuple[list[int], list[float]] | None:
    """A completion choice's generated token ids and their logprobs (vLLM's `token_ids` and
    `logprobs.token_logprobs`), or None unless they are integers with one number each."""
    ids = choice.get("token_ids")
    logprobs = choice["logprobs"].get("token_logprobs") if isinstance(choice.get("logprobs"), dict) else None
    if not (isinstance(ids, list) and isinstance(logprobs, list) and len(ids) == len(logprobs)):
        return None
    if not all(type(i) is int for i in ids) or not all(type(v) in (int, float) for v in logprobs):
        return None  # `type` rather than isinstance: JSON true is no token id
    return ids, [float(v) for v in logprobs]


def _shortened(text: str, limit: int = 200) -> str:
    """`text` on one line, cut to `limit` characters."""
    text = " ".join(text.split())
    if not text:
        return "an empty body"
    return text if len(text) <= limit else text[:limit] + "..."


def _error_text(response: httpx.Response) -> str:
    """The server's error message on one line, shortened."""
    try:
        body = response.json()
        error = body.get("error", body) if isinstance(body, dict) else body
        text = str(error.get("message", error) if isinstance(error, dict) else error)
    except ValueError:
        text = response.text
    return _shortened(text, 300)
