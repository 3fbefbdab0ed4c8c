"""The search page of `neighborretr-search serve`: one plain HTML page and a JSON API (FastAPI).

    GET /                      the page: search box, normalisation selector, results as looping clips
    GET /api/search?q=&normalization=&top_k=   a `SearchResult` as JSON (hits carry a clip URL)
    GET /clip/{item}           the video file of index row `item`

Clips are served by index row only: the row's stored path is resolved (symlinks followed) and refused unless it
lies inside the indexed folder, so no request can read another file.
"""

from __future__ import annotations

import html
from pathlib import Path

from neighborretr.search import Searcher

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>neighborretr search</title>
<style>
 body {{ font-family: sans-serif; margin: 2em; background: #fafafa; }}
 form {{ margin-bottom: 1em; }} input[type=text] {{ width: 32em; padding: .4em; font-size: 1em; }}
 #results {{ display: flex; flex-wrap: wrap; gap: 1em; }}
 .hit {{ background: #fff; border: 1px solid #ccc; padding: .5em; width: 200px; font-size: .85em; }}
 .hit video {{ width: 200px; height: 150px; background: #000; image-rendering: pixelated; }}
 #status {{ color: #555; margin: .5em 0; }}
</style></head>
<body>
<h2>neighborretr search <small>({size} videos in {root})</small></h2>
<form id="search">
 <input type="text" id="q" name="q" placeholder="what the video shows, e.g. a red circle moves to the left" autofocus>
 <select id="normalization" name="normalization">{options}</select>
 <input type="number" id="top_k" name="top_k" value="8" min="1" max="100" style="width:4em">
 <button type="submit" id="go">Search</button>
</form>
<div id="status"></div>
<div id="results"></div>
<script>
const form = document.getElementById("search");
form.addEventListener("submit", async (event) => {{
  event.preventDefault();
  const params = new URLSearchParams({{q: q.value, normalization: normalization.value, top_k: top_k.value}});
  const status = document.getElementById("status"), results = document.getElementById("results");
  status.textContent = "searching...";
  const response = await fetch("/api/search?" + params);
  const body = await response.json();
  if (!response.ok) {{ status.textContent = "error: " + body.detail; results.replaceChildren(); return; }}
  const t = body.timings_ms;
  status.textContent = `${{body.hits.length}} results (${{body.normalization}}, ${{body.candidates}} candidates, ` +
    `${{t.total.toFixed(1)}} ms)`;
  results.replaceChildren(...body.hits.map((hit) => {{
    const card = document.createElement("div");
    card.className = "hit"; card.dataset.path = hit.path; card.dataset.rank = hit.rank;
    const video = document.createElement("video");
    Object.assign(video, {{src: hit.url, autoplay: true, loop: true, muted: true, playsInline: true}});
    const label = document.createElement("div");
    label.className = "label";
    label.textContent = `#${{hit.rank}}  ${{hit.path}}  score ${{hit.score.toFixed(4)}}`;
    card.append(video, label);
    return card;
  }}));
}});
</script>
</body></html>
"""


def clip_path(searcher: Searcher, item: int) -> Path | None:
    """The file of index row `item` when it exists inside the indexed folder, else None."""
    manifest = searcher.index.manifest
    if not 0 <= item < len(manifest.items):
        return None
    root = Path(manifest.video_root).resolve()
    path = (root / manifest.items[item]["path"]).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


def create_app(searcher: Searcher):
    """The FastAPI app of one searcher (kept in memory: the index and the model are loaded once)."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse, HTMLResponse

    app = FastAPI(title="neighborretr search")
    manifest = searcher.index.manifest
    options = "".join(f'<option value="{m}">{m}</option>' for m in searcher.methods)
    page = PAGE.format(size=len(manifest.items), root=html.escape(manifest.video_root), options=options)

    @app.get("/", response_class=HTMLResponse)
    def index_page() -> str:
        return page

    @app.get("/api/search")
    def search(q: str, normalization: str = "none", top_k: int = 8) -> dict:
        try:
            result = searcher.search(q, max(1, min(top_k, 100)), normalization)
        except ValueError as err:
            raise HTTPException(status_code=400, detail=str(err)) from err
        body = result.to_json()
        for hit in body["hits"]:
            hit["url"] = f"/clip/{hit['item']}"
        return body

    @app.get("/clip/{item}")
    def clip(item: int) -> FileResponse:
        path = clip_path(searcher, item)
        if path is None:
            raise HTTPException(status_code=404, detail="no such clip in the indexed folder")
        return FileResponse(path)

    return app


def serve(searcher: Searcher, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serves the page until interrupted."""
    import uvicorn

    print(f"serving {len(searcher.index.manifest.items)} videos on http://{host}:{port}")
    uvicorn.run(create_app(searcher), host=host, port=port, log_level="warning")
