"""Request and response bodies of every route (pydantic), and the one error body all failures use (`ErrorResponse`;
raised as `blip.serve.errors.ApiError`).

Three request schemas:
- Azure ML online endpoint (`POST /score`): `{"input_data": {"columns", "index", "data"}}` -> `[{"text": ...}]`.
- The model card's custom schema (`POST /`, `POST /predict`): `{"secret_token", "inputs": {"texts", "images"}}`
  -> `{"captions": [{"image_results": [...]}]}`.
- Our own API (`POST /v1/...`), with scores and the task options of `blip.tasks.options` (fields generated from
  them: the same names, defaults, ranges and error messages as the Python API and the command lines).
Limits that depend on the server's settings (images per request, tokens, beams) are checked by the routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, create_model, model_validator

from blip.tasks.options import MAX_BEAMS, CaptionOptions, OptionError, OptionsT, Spec, TaskOptionsBase, VqaOptions


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


Text = Annotated[str, Field(min_length=1), AfterValidator(_not_blank)]
ModelName = Annotated[str | None, Field(description="a loaded model's name; default: the first that can do the task")]


EXAMPLE_PNG = (  # a 2x2 red PNG, for the schema's examples
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8oaHBwMDAxMDAwMDAAAAN6gEcJJUQNAAAAABJRU5ErkJggg=="
)


def _examples(*examples: dict[str, Any]) -> dict[str, Any]:
    return {"examples": list(examples)}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Lenient(BaseModel):
    """External schemas and form fields: unknown fields are ignored (as the services that defined those schemas do;
    and a form's file parts arrive beside its fields)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# --- errors ------------------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. invalid_request, invalid_image, url_refused")
    message: str = Field(description="what is wrong, starting with the field it concerns")
    field: str | None = Field(None, description="the request field at fault, e.g. inputs.images[0].url")


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- images ------------------------------------------------------------------------------------------------------


class ImageRef(_Strict):
    """An image by public http(s) URL or as base64 of the encoded file (PNG, JPEG, GIF, WebP, BMP, TIFF)."""

    url: str | None = Field(None, min_length=1, max_length=4096, description="http:// or https:// URL")
    b64: str | None = Field(None, min_length=1, description="base64 of the image file (whitespace is ignored)")

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageRef:
        if (self.url is None) == (self.b64 is None):
            raise ValueError("give exactly one of 'url' or 'b64'")
        return self


# --- Azure ML online endpoint (POST /score) ------------------------------------------------------------------------


class AzureInputData(_Lenient):
    columns: list[str] = Field(
        min_length=1, max_length=2, description='["image"] to caption, ["image", "text"] to answer questions'
    )
    index: list[int | str] | None = Field(None, description="row ids; the answer list follows this order")
    data: list[list[str]] = Field(min_length=1, description="rows: [image] or [image, question]; image = URL or base64")


class AzureRequest(_Lenient):
    model_config = ConfigDict(
        json_schema_extra=_examples(
            {"input_data": {"columns": ["image"], "index": [0], "data": [[EXAMPLE_PNG]]}},
            {"input_data": {"columns": ["image", "text"], "index": [7], "data": [[EXAMPLE_PNG, "what colour?"]]}},
        )
    )
    input_data: AzureInputData
    params: dict[str, Any] | None = Field(None, description="accepted and ignored")


class AzureResult(BaseModel):
    text: str


# --- the model card's schema (POST /, POST /predict) ---------------------------------------------------------------


class CardInputs(_Lenient):
    texts: list[Annotated[list[Text], Field(min_length=1)]] | None = Field(
        None, description="texts[i]: the questions about images[i]; leave out to caption"
    )
    images: list[ImageRef] = Field(min_length=1)


class CardRequest(_Lenient):
    model_config = ConfigDict(
        json_schema_extra=_examples(
            {"inputs": {"texts": [["what is it?", "what colour?"]], "images": [{"b64": EXAMPLE_PNG}]}},
            {"inputs": {"images": [{"b64": EXAMPLE_PNG}]}},
        )
    )
    secret_token: str | None = Field(None, description="compared with the server's token when it has one")
    inputs: CardInputs


class CardImageResult(BaseModel):
    image_results: list[str] = Field(description="one answer per question, in order (or the caption)")


class CardResponse(BaseModel):
    captions: list[CardImageResult]


# --- our API (POST /v1/...) ---------------------------------------------------------------------------------------


def _option_field(cls: type[TaskOptionsBase], name: str, spec: Spec, default: Any) -> tuple[Any, Any]:
    """A request field for an option of `blip.tasks.options`: its type, default, range (in the schema) and help, and
    the options layer's own check, so a bad value gets the same message here as on every other face."""

    def check(value: Any) -> Any:
        try:
            return cls.coerce(name, value)
        except OptionError as e:
            raise ValueError(e.reason) from None  # the route's error message puts the field name in front

    bounds: dict[str, Any] = {}
    if spec.minimum is not None:
        bounds["gt" if spec.exclusive_minimum else "ge"] = spec.minimum
    if spec.maximum is not None:
        bounds["le"] = spec.maximum
    if spec.max_length is not None:
        bounds["max_length"] = spec.max_length
    if spec.kind == "texts":
        bounds["min_length"] = 1
    annotation = Annotated[spec.annotation, BeforeValidator(check)]
    return annotation, Field(default, description=spec.help, **bounds)


def option_model(name: str, cls: type[TaskOptionsBase], base: type[BaseModel], doc: str) -> type[BaseModel]:
    """A pydantic model with a field per option of `cls` (generated: a new option appears here by itself)."""
    fields = {n: _option_field(cls, n, spec, cls.defaults()[n]) for n, spec in cls.specs().items()}
    model = create_model(name, __base__=base, __doc__=doc, __module__=__name__, **fields)  # type: ignore[call-overload]
    return model


def to_options(params: BaseModel, cls: type[OptionsT]) -> OptionsT:
    """The request's options (rules between options checked here: OptionError naming the field)."""
    return cls.from_mapping(dict(params))  # it takes the options' own fields from the request's


CaptionParams = option_model(
    "CaptionParams",
    CaptionOptions,
    _Strict,
    "Generation options (`blip.tasks.options.CaptionOptions`); the server may cap max_new_tokens, num_beams and "
    "num_captions lower.",
)


class CaptionRequest(CaptionParams):
    model_config = ConfigDict(
        json_schema_extra=_examples({"images": [{"b64": EXAMPLE_PNG}], "num_beams": 3, "max_new_tokens": 20})
    )
    images: list[ImageRef] = Field(min_length=1)
    model: ModelName = None


class CaptionForm(CaptionParams):
    """Multipart form fields of /v1/caption/upload (the images are the `images` file parts)."""

    model_config = _Lenient.model_config
    model: ModelName = None


class CaptionOut(BaseModel):
    text: str
    score: float | None = Field(description="sequence log-probability (beam: length-penalised); null if not finite")
    token_ids: list[int]


class CaptionResult(BaseModel):
    captions: list[CaptionOut]


class CaptionResponse(BaseModel):
    model: str
    results: list[CaptionResult] = Field(description="one per image, in order")


VqaParams = option_model(
    "VqaParams",
    VqaOptions,
    _Strict,
    "Answering options (`blip.tasks.options.VqaOptions`); the server may cap max_new_tokens and num_beams lower.",
)


class VqaRequest(VqaParams):
    model_config = ConfigDict(
        json_schema_extra=_examples({"images": [{"b64": EXAMPLE_PNG}], "questions": [["what is it?", "how many?"]]})
    )
    images: list[ImageRef] = Field(min_length=1)
    questions: list[Annotated[list[Text], Field(min_length=1)]] = Field(
        min_length=1, description="questions[i]: the questions about images[i]"
    )
    model: ModelName = None


class VqaForm(option_model("VqaFormOptions", VqaOptions, _Lenient, "VqaOptions as form fields")):  # type: ignore[misc]
    """Multipart form fields of /v1/vqa/upload: every question is asked about every uploaded image."""

    questions: list[Text] = Field(min_length=1)
    model: ModelName = None


class AnswerOut(BaseModel):
    question: str
    text: str
    score: float | None
    token_ids: list[int]


class VqaResult(BaseModel):
    answers: list[AnswerOut]


class VqaResponse(BaseModel):
    model: str
    results: list[VqaResult] = Field(description="one per image, one answer per question")


class PairRequest(_Strict):
    model_config = ConfigDict(
        json_schema_extra=_examples({"images": [{"b64": EXAMPLE_PNG}], "texts": ["a red square", "a dog"]})
    )
    images: list[ImageRef] = Field(min_length=1)
    texts: list[Text] = Field(min_length=1)
    model: ModelName = None


class TextsForm(_Lenient):
    """Multipart form fields of /v1/match/upload and /v1/similarity/upload."""

    texts: list[Text] = Field(min_length=1)
    model: ModelName = None


class EmbedRequest(_Strict):
    model_config = ConfigDict(json_schema_extra=_examples({"images": [{"b64": EXAMPLE_PNG}]}))
    images: list[ImageRef] = Field(min_length=1)
    model: ModelName = None


class ModelForm(_Lenient):
    """Multipart form fields of /v1/embed/upload."""

    model: ModelName = None


class EmbedResponse(BaseModel):
    model: str
    shape: list[int] = Field(
        description="of `embeddings`: [images, dim] for BLIP; [images, queries, dim] for BLIP-2, which has one "
        "feature per query token"
    )
    embeddings: list[list[float]] | list[list[list[float]]] = Field(
        description="L2-normalised ITC image features, one per image, in order: BLIP [dim]; BLIP-2 [queries][dim] "
        "(its image-text similarity is the largest cosine over the queries)"
    )


class MatchResponse(BaseModel):
    model: str
    scores: list[float] = Field(
        description="P(match) per pair: one image with each text, each image with one text, or pairwise"
    )


class ReasonRequest(_Strict):
    """NLVR2: statement i is about the pair (image_a[i], image_b[i]); a list of one item goes with every pair."""

    model_config = ConfigDict(
        json_schema_extra=_examples(
            {
                "image_a": [{"b64": EXAMPLE_PNG}],
                "image_b": [{"b64": EXAMPLE_PNG}],
                "statements": ["both images show a red square"],
            }
        )
    )
    image_a: list[ImageRef] = Field(min_length=1, description="the left image of each pair")
    image_b: list[ImageRef] = Field(min_length=1, description="the right image of each pair")
    statements: list[Text] = Field(min_length=1)
    model: ModelName = None


class VerdictOut(BaseModel):
    label: bool = Field(description="whether the statement is true: score >= 0.5")
    score: float = Field(description="P(true) from the NLVR2 head")


class ReasonResponse(BaseModel):
    model: str
    results: list[VerdictOut] = Field(description="one per statement, in order")


class SimilarityResponse(BaseModel):
    model: str
    scores: list[list[float]] = Field(
        description="ITC cosine similarity [image][text] (BLIP-2: the largest over the image's query-token features)"
    )


MAX_TOP_K = 1000  # the schema's bound on top_k; the server's own limit (--max-top-k) may be lower


class RetrieveRequest(_Strict):
    """A text or an image query against a collection index served with `--index`."""

    model_config = ConfigDict(
        json_schema_extra=_examples({"text": "a red square", "top_k": 3}, {"image": {"b64": EXAMPLE_PNG}, "top_k": 3})
    )
    index: str | None = Field(None, description="a served index's name; may be left out when the server has one")
    text: Text | None = Field(None, description="find the images that match this text")
    image: ImageRef | None = Field(None, description="find the images most similar to this one (ITC only)")
    top_k: int = Field(10, ge=1, le=MAX_TOP_K, description="results wanted; the server may cap it lower")
    rerank: bool | None = Field(
        None,
        description="text queries: re-rank the ITC top_k by the ITM match probability (default: when the model has "
        "an ITM head); image queries are ranked by ITC similarity only",
    )


class RetrieveHit(BaseModel):
    rank: int = Field(description="1 = best")
    image: str = Field(description="the collection row's id (as in the index's rows.jsonl and `blip retrieve`)")
    itc_score: float = Field(description="ITC cosine similarity of the query and the image")
    itm_score: float | None = Field(description="ITM match probability (re-ranked text queries), else null")


class RetrieveResponse(BaseModel):
    index: str
    model: str = Field(description="the served model that embedded the collection and the query")
    query: Literal["text", "image"]
    reranked: bool = Field(description="true when the results are ordered by itm_score, else by itc_score")
    results: list[RetrieveHit] = Field(description="best first; fewer than top_k when the collection is smaller")


class IndexOut(BaseModel):
    name: str
    model: str
    count: int = Field(description="images in the collection")
    dim: int
    kind: str = Field(description="flat, ivf or hnsw")
    backend: str = Field(description="faiss or numpy")


class IndexesResponse(BaseModel):
    indexes: list[IndexOut]


# --- service -----------------------------------------------------------------------------------------------------


class ModelInfo(BaseModel):
    name: str
    family: Literal["blip", "blip2"] = Field(description="BLIP or BLIP-2")
    kind: str = Field(description="the checkpoint's kind: BLIP caption, vqa or retrieval; BLIP-2 opt, t5 or retrieval")
    tasks: list[str] = Field(description="caption, vqa, itm (/v1/match), itc (/v1/similarity, /v1/embed)")
    source: str
    # (no default: always given; `blip.tasks.options` is the one place that gives an option's name a default)
    prompt_template: Annotated[
        str | None,
        Field(description='BLIP-2 OPT and T5: the prompt a question is put in ("{}": the question); else null'),
    ]


class OpenAiModel(BaseModel):
    """A model as the OpenAI API lists it (GET /v1/models `data`)."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="when the server loaded it (Unix seconds)")
    owned_by: str = "blip"


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    # the OpenAI API's list (openai's `client.models.list()` reads these two)
    object: Literal["list"] = "list"
    data: list[OpenAiModel] = Field(default_factory=list, description="the same models as the OpenAI API lists them")


class StatusResponse(BaseModel):
    status: Literal["ok", "ready", "not ready"]
    models: list[str] = Field(default_factory=list)
    indexes: list[str] = Field(default_factory=list)
    reason: str | None = None


# --- Hugging Face Inference (POST /hf, /hf/{model}) -------------------------------------------------------------------


HF_GENERATION_PARAMETERS = (  # the Hugging Face generation parameters this server runs: `CaptionOptions` of those names
    "do_sample",
    "max_new_tokens",
    "min_new_tokens",
    "num_beams",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "length_penalty",
    "seed",
)
HfGenerationParameters = create_model(  # type: ignore[call-overload]
    "HfGenerationParameters",
    __base__=_Strict,
    __doc__="The Hugging Face image-to-text `generation_parameters` this server runs (`CaptionOptions`; left out: "
    "its default); an unknown one is refused, naming it.",
    __module__=__name__,
    use_cache=(bool | None, Field(None, description="accepted and ignored (the decoder always caches)")),
    **{
        name: (
            CaptionOptions.specs()[name].annotation | None,
            Field(None, description=CaptionOptions.specs()[name].help),
        )
        for name in HF_GENERATION_PARAMETERS
    },
)


class HfCaptionParameters(_Strict):
    max_new_tokens: int | None = Field(None, description="most tokens to generate")
    generation_parameters: HfGenerationParameters | None = None


class HfImageToTextRequest(_Lenient):
    """Image-to-text as JSON (the raw image file as the body works too)."""

    model_config = ConfigDict(
        json_schema_extra=_examples({"inputs": EXAMPLE_PNG, "parameters": {"max_new_tokens": 20}})
    )
    inputs: str = Field(min_length=1, description="the image: base64, an http(s) URL or a data:image/...;base64 URL")
    parameters: HfCaptionParameters | None = None


class HfVqaInputs(_Lenient):
    image: str = Field(min_length=1, description="base64, an http(s) URL or a data:image/...;base64 URL")
    question: Text


class HfVqaParameters(_Lenient):
    top_k: int | None = Field(
        None, ge=1, le=MAX_BEAMS, description="answers wanted: k > 1 gives the k best beams of beam search of width k"
    )


class HfVqaRequest(_Lenient):
    """Visual question answering, as the Hugging Face Inference API documents it."""

    model_config = ConfigDict(
        json_schema_extra=_examples(
            {"inputs": {"image": EXAMPLE_PNG, "question": "what colour is it?"}, "parameters": {"top_k": 1}}
        )
    )
    inputs: HfVqaInputs
    parameters: HfVqaParameters | None = None


class HfVqaFlatRequest(_Lenient):
    """Visual question answering as huggingface_hub's InferenceClient sends it: the image (base64) in `image` and
    again in `inputs`, the question beside them."""

    model_config = ConfigDict(
        json_schema_extra=_examples(
            {"inputs": EXAMPLE_PNG, "image": EXAMPLE_PNG, "question": "what colour is it?", "parameters": {}}
        )
    )
    inputs: str | None = Field(None, description="the image again (used when `image` is left out)")
    image: str | None = Field(None, min_length=1, description="base64, an http(s) URL or a data:image/...;base64 URL")
    question: Text
    parameters: HfVqaParameters | None = None


class HfGeneratedText(BaseModel):
    generated_text: str


class HfAnswer(BaseModel):
    answer: str
    score: float = Field(description="the answer's probability under the model: exp(its sequence log-probability)")


class HfErrorResponse(BaseModel):
    """The Hugging Face Inference API's error shape (huggingface_hub puts `error` in its HfHubHTTPError)."""

    error: str = Field(description="what is wrong, starting with the field it concerns")
    error_type: str = Field(description="machine-readable reason, as `code` in this server's other errors")


# --- OpenAI chat completions (POST /v1/chat/completions) -------------------------------------------------------------


class ChatImageUrl(_Lenient):
    url: str = Field(min_length=1, description="a data:image/...;base64 URL or an http(s) URL")
    detail: str | None = Field(None, description="accepted and ignored")


class ChatContentPart(_Lenient):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ChatImageUrl | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ChatContentPart] | None = None


class ChatStreamOptions(_Lenient):
    include_usage: bool = False


class ChatRequest(_Lenient):
    """An OpenAI chat completion request: the last message is the user's, holding one `image_url` part and
    optionally `text` (the caption's prompt, or the question for a model that answers questions)."""

    model_config = ConfigDict(
        json_schema_extra=_examples(
            {
                "model": "captioner",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{EXAMPLE_PNG}"}}
                        ],
                    }
                ],
                "max_tokens": 20,
            }
        )
    )
    model: str = Field(min_length=1, description="a loaded model's name (GET /v1/models lists them)")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate (default: the task's)")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="above 0: sample (0 or none: greedy)")
    top_p: float | None = Field(None, gt=0, le=1, description="given: sample, with this nucleus mass")
    n: int = Field(1, ge=1, le=16, description="choices: sampled ones when sampling, else the n best beams")
    seed: int | None = Field(None, ge=0, le=2**53, description="sampling: the same seed gives the same choices")
    stream: bool = Field(False, description="server-sent chat.completion.chunk events, then data: [DONE]")
    stream_options: ChatStreamOptions | None = None
    user: str | None = Field(None, description="accepted and ignored")


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatUsage(BaseModel):
    prompt_tokens: int = Field(description="the text's tokens as the model reads them (special tokens included)")
    completion_tokens: int = Field(description="tokens the model generated, over all choices (end token included)")
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage


class OpenAiErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error or server_error")
    param: str | None = Field(description="the request field at fault")
    code: str | None = Field(description="machine-readable reason, as in this server's other errors")


class OpenAiErrorResponse(BaseModel):
    error: OpenAiErrorDetail
