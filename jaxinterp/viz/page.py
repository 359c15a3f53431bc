"""One self-contained HTML page: attention patterns per layer and head, and per-token logit-lens
predictions. No network, no external files: data as JSON, plus a little CSS and JavaScript."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from jaxinterp.model import Model
from jaxinterp.viz.data import ViewData, view_data

__all__ = ["attention_page", "page_html"]


def _payload(data: ViewData, digits: int = 3) -> dict:
    n_layers = 0 if data.patterns is None else data.patterns.shape[0]
    n_heads = 0 if data.patterns is None else data.patterns.shape[1]
    patterns = None if data.patterns is None else np.round(data.patterns, digits).tolist()
    return {"tokens": data.labels, "ids": data.tokens.tolist(), "n_layers": n_layers, "n_heads": n_heads,
            "patterns": patterns, "lens_sites": list(data.lens_sites), "lens_ids": data.lens_ids.tolist(),
            "lens_probs": np.round(data.lens_probs, 4).tolist(), "vocab": {str(k): v for k, v in data.vocab.items()}}


def page_html(data: ViewData, *, title: str = "Attention and logit lens", meta: str = "") -> str:
    """The page for ``data`` as one string."""
    payload = json.dumps(_payload(data), separators=(",", ":")).replace("</", "<\\/")
    return (_TEMPLATE.replace("%TITLE%", html.escape(title)).replace("%META%", html.escape(meta))
            .replace("%DATA%", payload))


def attention_page(model: Model, tokens, path, *, top_k: int = 5, title: Optional[str] = None,
                   meta: Optional[str] = None) -> Path:
    """Write the interactive page for one sequence (string, ``[T]`` or ``[1, T]`` ids) to ``path``
    (atomically) and return it. Open it in any browser; it needs no server and no network."""
    data = view_data(model, tokens, top_k=top_k)
    default_meta = (f"{model.family}, {model.config.n_layers} layers, {len(data.tokens)} tokens; logit lens = the "
                    f"model's final norm and unembedding applied to each layer's residual stream")
    text = page_html(data, title=title or "Attention and logit lens", meta=meta if meta is not None else default_meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>%TITLE%</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:20px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:22px 0 6px}
.meta{color:#666;margin-bottom:10px} .hint{color:#777;font-size:12px;margin:2px 0 8px}
.controls label{margin-right:14px} select{font-size:13px}
.wrap{display:flex;gap:24px;align-items:flex-start;flex-wrap:wrap}
table{border-collapse:collapse} td,th{padding:0}
.attn td.c{width:16px;height:16px;border:1px solid #f4f4f4;cursor:pointer}
.attn th{font-weight:normal;font-size:11px;font-family:monospace;white-space:pre;color:#333}
.attn th.k{writing-mode:vertical-rl;transform:rotate(180deg);height:auto;padding:2px 0;max-height:90px;overflow:hidden}
.attn th.q{text-align:right;padding-right:4px;cursor:pointer} .attn th.q.sel{background:#ffe08a}
.strip span{font-family:monospace;white-space:pre;padding:2px 1px;margin:1px;border-radius:3px;display:inline-block;
  border:1px solid #ddd;cursor:pointer} .strip span.sel{outline:2px solid #e69500}
.lens td,.lens th{border:1px solid #ddd;font-family:monospace;font-size:12px;white-space:pre;padding:2px 4px}
.lens th{background:#f6f6f6;font-weight:normal} .lens td{cursor:pointer;min-width:28px}
.lens td.hit{font-weight:bold;text-decoration:underline} .lens td.sel{outline:2px solid #e69500}
#detail{font-family:monospace;font-size:12px;white-space:pre;min-height:40px;border:1px solid #ddd;padding:6px;max-width:420px}
</style></head><body>
<h1>%TITLE%</h1><div class="meta">%META%</div>
<section id="attn-section"><h2>Attention patterns</h2>
<div class="controls"><label>layer <select id="layer"></select></label>
<label>head <select id="head"></select></label></div>
<div class="hint">Rows: query tokens, columns: key tokens; darker = more attention. Click a query token (or a row)
to shade the sequence below by where it attends.</div>
<div class="wrap"><table class="attn" id="grid"></table></div>
<div class="strip" id="strip"></div></section>
<section><h2>Logit lens</h2>
<div class="hint">Each cell: the top prediction for the next token when the model's final norm and unembedding read
that layer's residual stream at that position; shade = its probability; <b><u>bold</u></b> = the actual next
token. Click a cell for the top-k list.</div>
<div class="wrap"><table class="lens" id="lens"></table><div id="detail">click a cell</div></div></section>
<script type="application/json" id="data">%DATA%</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const T = D.tokens.length;
let query = T - 1;
function blue(v){const a=[255,255,255],b=[8,81,156];return "rgb("+a.map((x,i)=>Math.round(x+(b[i]-x)*v)).join(",")+")";}
function green(v){const a=[255,255,255],b=[35,139,69];return "rgb("+a.map((x,i)=>Math.round(x+(b[i]-x)*v)).join(",")+")";}
function ink(v){return v>0.55?"#fff":"#111";}
function el(tag,attrs,text){const e=document.createElement(tag);Object.assign(e,attrs||{});if(text!==undefined)e.textContent=text;return e;}
function pattern(){
  const l=+document.getElementById("layer").value, h=document.getElementById("head").value;
  if(h!=="mean")return D.patterns[l][+h];
  const m=[];for(let q=0;q<T;q++){m.push(new Array(T).fill(0));
    for(let k=0;k<T;k++){for(let j=0;j<D.n_heads;j++)m[q][k]+=D.patterns[l][j][q][k]/D.n_heads;}}
  return m;
}
function drawGrid(){
  const P=pattern(), g=document.getElementById("grid");g.replaceChildren();
  const head=el("tr");head.appendChild(el("th"));
  D.tokens.forEach(s=>head.appendChild(el("th",{className:"k"},s)));g.appendChild(head);
  for(let q=0;q<T;q++){const tr=el("tr");
    const th=el("th",{className:"q"+(q===query?" sel":"")},D.tokens[q]);th.onclick=()=>{query=q;drawGrid();};tr.appendChild(th);
    for(let k=0;k<T;k++){const v=P[q][k];
      const td=el("td",{className:"c",title:D.tokens[q]+" -> "+D.tokens[k]+": "+v.toFixed(3)});
      td.style.background=blue(v);td.onclick=()=>{query=q;drawGrid();};tr.appendChild(td);}
    g.appendChild(tr);}
  const strip=document.getElementById("strip");strip.replaceChildren(el("span",{style:"border:none"},"query "+JSON.stringify(D.tokens[query])+" attends to: "));
  for(let k=0;k<T;k++){const v=P[query][k];
    const s=el("span",{className:k===query?"sel":"",title:v.toFixed(3)},D.tokens[k]);
    s.style.background=blue(v);s.style.color=ink(v);s.onclick=()=>{query=k;drawGrid();};strip.appendChild(s);}
}
function drawLens(){
  const t=document.getElementById("lens");t.replaceChildren();
  const head=el("tr");head.appendChild(el("th",{},"site \\ input"));
  D.tokens.forEach(s=>head.appendChild(el("th",{},s)));t.appendChild(head);
  for(let r=D.lens_sites.length-1;r>=0;r--){const tr=el("tr");
    tr.appendChild(el("th",{},D.lens_sites[r].replace(".resid_post","").replace("blocks.","layer ")));
    for(let p=0;p<T;p++){const id=D.lens_ids[r][p][0], v=D.lens_probs[r][p][0];
      const td=el("td",{className:(p+1<T&&D.ids[p+1]===id)?"hit":""},D.vocab[id]);
      td.style.background=green(v);td.style.color=ink(v);
      td.onclick=()=>{document.querySelectorAll(".lens td.sel").forEach(x=>x.classList.remove("sel"));td.classList.add("sel");
        const lines=D.lens_ids[r][p].map((i,j)=>(D.lens_probs[r][p][j]*100).toFixed(1).padStart(5)+"%  "+JSON.stringify(D.vocab[i]));
        document.getElementById("detail").textContent=D.lens_sites[r]+" at "+JSON.stringify(D.tokens[p])
          +(p+1<T?" (next: "+JSON.stringify(D.tokens[p+1])+")":"")+"\n"+lines.join("\n");};
      tr.appendChild(td);}
    t.appendChild(tr);}
}
if(D.patterns===null){document.getElementById("attn-section").style.display="none";}
else{const ls=document.getElementById("layer"), hs=document.getElementById("head");
  for(let l=0;l<D.n_layers;l++)ls.appendChild(el("option",{value:l},String(l)));
  for(let h=0;h<D.n_heads;h++)hs.appendChild(el("option",{value:h},String(h)));
  hs.appendChild(el("option",{value:"mean"},"mean"));
  ls.onchange=drawGrid;hs.onchange=drawGrid;drawGrid();}
drawLens();
document.body.dataset.ready="1";
</script></body></html>
"""
