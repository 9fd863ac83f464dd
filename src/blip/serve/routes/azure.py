"""`POST /score`, the Azure ML online-endpoint schema: `{"input_data": {"columns", "index", "data"}}` ->
`[{"text": ...}]`, one result per row.

The model, in order: the `model` query parameter; the `azureml-model-deployment` header (which Azure ML sends) when
it names a loaded model; else by the columns: `["image"]` goes to the first captioning model, `["image", "text"]` to
the first VQA model (or, with none loaded, to the first captioning model). A model that answers questions takes
`text` as the question (a BLIP VQA model needs the text column; a BLIP-2 OPT or T5 model, which also captions,
captions `["image"]` rows and answers `["image", "text"]` rows in its prompt template). A caption-only model takes
`text` as the caption's prompt (conditional captioning: "a picture of" -> "a picture of a dog ..."; an empty text
captions without one). Row errors name the row: `input_data.data[3][1]`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Header

from blip.serve.errors import ERRORS, ApiError
from blip.serve.inputs import ImageSource, from_string, gather_all
from blip.serve.routes.shared import AUTH, ModelQuery, ServiceDep, api_router
from blip.serve.schemas import AzureInputData, AzureRequest, AzureResult
from blip.serve.service import Service
from blip.tasks.common import Caption
from blip.tasks.options import CaptionOptions, OptionError, VqaOptions

if TYPE_CHECKING:
    from blip.api import Blip

AZURE_DEPLOYMENT = "azureml-model-deployment"  # the header Azure ML routes by: used when it names a loaded model
Deployment = Annotated[
    str | None,
    Header(
        alias=AZURE_DEPLOYMENT, description="Azure ML's deployment name: picks the model when it names a loaded one"
    ),
]

router = api_router("Azure ML")


@router.post(
    "/score",
    response_model=list[AzureResult],
    responses=ERRORS,
    summary='Azure ML online endpoint: columns ["image"] captions, ["image", "text"] answers (or prompts)',
    dependencies=AUTH,
)
async def score(
    body: AzureRequest, svc: ServiceDep, model: ModelQuery = None, deployment: Deployment = None
) -> list[AzureResult]:
    """Captions (`["image"]`, or `["image", "text"]` with a caption-only model: text is the prompt) or answers
    (`["image", "text"]` with a model that answers questions, BLIP-2's included). The model: `?model=`, else the
    `azureml-model-deployment` header when it names a loaded model, else the first that fits the columns (VQA for a
    text column, when one is loaded)."""
    data = body.input_data
    _check_rows(svc, data)
    with_text = data.columns == ["image", "text"]
    name, blip, task = _target(svc, model, deployment, with_text)
    sources = [from_string(row[0], f"input_data.data[{i}][0]") for i, row in enumerate(data.data)]
    texts = [row[1] for row in data.data] if with_text else [""] * len(sources)
    svc.check_texts([(f"input_data.data[{i}][1]", t) for i, t in enumerate(texts)])
    if task == "caption":
        svc.check_count(len(sources), svc.settings.max_images, "input_data.data", "images")
        return await _captions(svc, name, blip, sources, [t if t.strip() else None for t in texts])
    return await _answers(svc, name, blip, sources, texts)


def _check_rows(svc: Service, data: AzureInputData) -> None:
    columns = data.columns
    if columns not in (["image"], ["image", "text"]):
        raise svc.invalid("input_data.columns", f'expected ["image"] or ["image", "text"], got {columns}')
    if data.index is not None and len(data.index) != len(data.data):
        raise svc.invalid("input_data.index", f"{len(data.index)} ids for {len(data.data)} rows")
    for i, row in enumerate(data.data):
        if len(row) != len(columns):
            raise svc.invalid(f"input_data.data[{i}]", f"expected {len(columns)} values ({columns}), got {len(row)}")


def _target(svc: Service, model: str | None, deployment: str | None, with_text: bool) -> tuple[str, Blip, str]:
    """(name, model, task) for /score: the named model's own task, else the first model for the columns."""
    name = model or None  # ?model= (empty) as if not given
    loaded = svc.models if svc.ready else {}
    if name is None and deployment in loaded:
        name = deployment
    if name in loaded:
        tasks = loaded[name].tasks
        if "caption" not in tasks and "vqa" in tasks and not with_text:
            raise svc.invalid("input_data.columns", f'model {name!r} answers questions: send columns ["image", "text"]')
        task = "vqa" if "vqa" in tasks and (with_text or "caption" not in tasks) else "caption"
    elif name is None and with_text and any("vqa" in m.tasks for m in loaded.values()):
        task = "vqa"
    else:
        task = "caption"
    resolved, blip = svc.resolve(name, task)
    return resolved, blip, task


def _prompt_error(svc: Service, row: int, field: str | None, message: str) -> ApiError:
    """A row's text refused as the caption prompt (the error of option `field`), named by the row."""
    return svc.invalid(f"input_data.data[{row}][1]", f"as a prompt: {message.removeprefix(f'{field}: ')}")


async def _captions(
    svc: Service, name: str, blip: Blip, sources: list[ImageSource], prompts: list[str | None]
) -> list[AzureResult]:
    """Rows with the same prompt go to the model together; a prompt's errors name its first row."""
    groups: dict[str | None, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    options: dict[str | None, CaptionOptions] = {}
    for prompt, rows in groups.items():
        try:
            options[prompt] = CaptionOptions(prompt=prompt)
        except OptionError as e:
            raise _prompt_error(svc, rows[0], e.field, str(e)) from e

    async def caption_group(prompt: str | None, rows: list[int]) -> list[list[Caption]]:
        try:
            return await svc.caption(name, blip, options[prompt], [sources[i] for i in rows], "input_data.data")
        except ApiError as e:
            if prompt is None or e.field not in ("prompt", "max_new_tokens"):
                raise
            raise _prompt_error(svc, rows[0], e.field, e.message) from e

    results = await gather_all([caption_group(p, rows) for p, rows in groups.items()])
    texts: list[str] = [""] * len(sources)
    for rows, captions in zip(groups.values(), results):
        for i, caption in zip(rows, captions):
            texts[i] = caption[0].text
    return [AzureResult(text=t) for t in texts]


async def _answers(
    svc: Service, name: str, blip: Blip, sources: list[ImageSource], texts: list[str]
) -> list[AzureResult]:
    """Each row's text is the question about its image (a repeated image is encoded once)."""
    svc.check_count(len(sources), svc.settings.max_texts, "input_data.data", "rows")
    svc.check_count(len({s.value for s in sources}), svc.settings.max_images, "input_data.data", "distinct images")
    for i, question in enumerate(texts):
        if not question.strip():
            raise svc.invalid(f"input_data.data[{i}][1]", "the question is empty")
    options = svc.vqa_options(VqaOptions(), blip)
    fields = [f"input_data.data[{i}][1]" for i in range(len(texts))]
    answers = await svc.answer(name, options, sources, texts, list(range(len(texts))), fields)
    return [AzureResult(text=a.text) for a in answers]
