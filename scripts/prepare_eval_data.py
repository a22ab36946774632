"""Convert the paper's eval corpora into the layout peer_jax reads: <out>/<name>/<split>.jsonl.

Each output line is {"text": ...}, one document. Obtain the raw files yourself (licences
differ; nothing here downloads):

  wikitext103  WikiText-103 raw (Merity et al. 2016), file `wiki.test.raw` from
               wikitext-103-raw-v1.zip. Split into articles at top-level " = Title = " lines.
  lambada      LAMBADA (Paperno et al. 2016), `lambada_test_plain_text.txt`: one passage per line.
  pile         The Pile (Gao et al. 2020) validation set, `val.jsonl` (decompress val.jsonl.zst
               first); the first --max_docs documents are kept (a fixed sample).
  curation     Curation Corpus (Curation 2020), `curation-corpus-base-with-articles.csv` after
               running its scraper; column `article_content`; first --max_docs rows.
  c4           needs no file: tfds `c4/en:3.1.0` (build it with `tfds build c4/en:3.1.0` or point
               TFDS_DATA_DIR at a bucket that has it, e.g. gs://tfds-data/datasets).

Usage: python scripts/prepare_eval_data.py NAME --input RAW_FILE [--out DIR] [--split validation]
Then train/eval with config.TrainConfig.eval_data_dir="DIR" (default: $PEER_JAX_EVAL_DATA).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from collections.abc import Iterator


def wikitext_articles(lines: Iterator[str]) -> Iterator[str]:
    title = re.compile(r"^ = [^=].* = $")
    doc: list[str] = []
    for line in lines:
        if title.match(line.rstrip("\n")) and any(x.strip() for x in doc):
            yield "".join(doc).strip()
            doc = []
        doc.append(line)
    if any(x.strip() for x in doc):
        yield "".join(doc).strip()


def read_docs(name: str, path: str, max_docs: int | None) -> Iterator[str]:
    with open(path, encoding="utf-8", newline="") as f:
        if name == "wikitext103":
            docs = wikitext_articles(f)
        elif name == "lambada":
            docs = (line.strip() for line in f if line.strip())
        elif name == "pile":
            docs = (json.loads(line)["text"] for line in f if line.strip())
        elif name == "curation":
            csv.field_size_limit(sys.maxsize)
            docs = (row["article_content"] for row in csv.DictReader(f) if row.get("article_content"))
        else:
            raise SystemExit(f"unknown eval set {name!r}; choose wikitext103, lambada, pile or curation.")
        for i, doc in enumerate(docs):
            if max_docs is not None and i >= max_docs:
                return
            yield doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=["wikitext103", "lambada", "pile", "curation"])
    p.add_argument("--input", required=True, help="the raw file (see above)")
    p.add_argument("--out", default=None, help="the eval data directory (default: $PEER_JAX_EVAL_DATA, else "
                   "~/.cache/peer_jax/eval_data); train and eval read it from TrainConfig.eval_data_dir")
    p.add_argument("--split", default="validation", help="split name the file is stored as (validation or test)")
    p.add_argument("--max_docs", type=int, default=None, help="keep only the first N documents (default: pile/curation 20000)")
    a = p.parse_args()
    max_docs = a.max_docs if a.max_docs is not None else (20000 if a.name in ("pile", "curation") else None)
    from peer_jax.data import eval_tasks

    out_dir = os.path.join(eval_tasks.data_dir(a.out), a.name)
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"{a.split}.jsonl")
    n = 0
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        for doc in read_docs(a.name, a.input, max_docs):
            f.write(json.dumps({"text": doc}) + "\n")
            n += 1
    os.replace(out + ".tmp", out)
    print(f"wrote {n} documents to {out}")


if __name__ == "__main__":
    main()
