"""Document processing for fournil's lm-eval tasks."""
import re


def clean(text: str) -> str:
    """HellaSwag's text as lm-eval cleans it: WikiHow's bracketed artifacts removed."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def hellaswag_docs(dataset):
    return dataset.map(lambda doc: {"query": clean(doc["ctx"]), "choices": [clean(e) for e in doc["endings"]],
                                    "label": int(doc["label"])})
