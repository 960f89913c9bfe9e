// alignloop labeling page: sign in with a token, rank answers (click / drag / keys), submit, next.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { token: null, me: null, campaigns: [], campaignId: null, assignment: null, groups: [], tieMode: false, busy: false };

// ---- API ------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail) { super(formatDetail(detail)); this.status = status; }
}

function formatDetail(detail) {
  if (Array.isArray(detail)) return detail.map((e) => (e.loc ? e.loc.join(".") + ": " : "") + e.msg).join("\n");
  return typeof detail === "string" ? detail : JSON.stringify(detail);
}

async function api(method, path, body) {
  const init = { method, headers: { Authorization: "Bearer " + state.token } };
  if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
  const r = await fetch(path, init);
  if (r.status === 204) return null;
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    if (r.status === 401) signOut("Your token was refused (revoked or wrong). Sign in again.");
    throw new ApiError(r.status, data.detail ?? r.statusText);
  }
  return data;
}

function showError(e) { $("error").textContent = e ? (e.message || String(e)) : ""; }
function showStatus(msg) { $("status").textContent = msg || ""; }

// ---- sign in / out --------------------------------------------------------------------------

async function signIn(token) {
  state.token = token;
  try {
    state.me = await api("GET", "/api/v1/me");
  } catch (e) {
    state.token = null;
    showError(e);
    return;
  }
  sessionStorage.setItem("alignloop-token", token);
  $("whoami").textContent = `Signed in as ${state.me.labeler.name} (${state.me.labeler.role})`;
  $("account").hidden = false;
  $("signin-panel").hidden = true;
  $("work-panel").hidden = false;
  showError(null);
  await loadCampaigns();
}

function signOut(message) {
  sessionStorage.removeItem("alignloop-token");
  Object.assign(state, { token: null, me: null, assignment: null, groups: [] });
  $("account").hidden = true;
  $("work-panel").hidden = true;
  $("signin-panel").hidden = false;
  $("token").value = "";
  showStatus("");
  showError(message ? { message } : null);
}

// ---- campaigns, items, progress -------------------------------------------------------------

async function loadCampaigns() {
  state.campaigns = await api("GET", "/api/v1/campaigns");
  const select = $("campaign");
  select.replaceChildren(...state.campaigns.map((c) => new Option(c.name, c.id)));
  const wanted = Number(new URLSearchParams(location.search).get("campaign"));
  const chosen = state.campaigns.find((c) => c.id === wanted) || state.campaigns[0];
  if (!chosen) { $("guidelines").textContent = "No campaigns yet."; return; }
  select.value = chosen.id;
  await selectCampaign(chosen.id);
}

async function selectCampaign(id) {
  state.campaignId = Number(id);
  const c = state.campaigns.find((x) => x.id === state.campaignId);
  $("guidelines").textContent = c.guidelines || "(no guidelines)";
  await nextItem();
}

async function refreshProgress() {
  const p = await api("GET", `/api/v1/campaigns/${state.campaignId}/progress`);
  $("progress").textContent = `You: ${p.my_rankings} ranked, ${p.my_skips} skipped · Campaign: ${p.items_complete} of ${p.items_total} items complete`;
}

async function nextItem() {
  state.assignment = await api("POST", `/api/v1/campaigns/${state.campaignId}/next`);
  state.groups = [];
  state.tieMode = false;
  $("rationale").value = "";
  $("item").hidden = !state.assignment;
  $("done").hidden = !!state.assignment;
  if (state.assignment) renderItem();
  // Not awaited: the new item takes keys (S, 1-9, Enter) from the moment it is shown. Awaiting the progress
  // call kept submit() busy for one more round trip, and a key pressed then was dropped.
  refreshProgress().catch(showError);
}

function renderItem() {
  const item = state.assignment.item;
  $("item-id").textContent = `#${item.id}`;
  const prompt = $("prompt");
  if (item.messages) {
    prompt.replaceChildren(...item.messages.map((m) => {
      const div = document.createElement("div");
      div.className = "turn";
      const who = document.createElement("b");
      who.textContent = m.role + ": ";
      div.append(who, document.createTextNode(m.content));
      return div;
    }));
  } else {
    prompt.textContent = item.prompt;
  }
  $("answers").replaceChildren(...item.answers.map((a, k) => {
    const card = document.createElement("div");
    card.className = "answer";
    card.dataset.answerId = a.id;
    card.tabIndex = 0;
    const key = document.createElement("span");
    key.className = "key";
    key.textContent = `Answer ${k + 1}`;
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.hidden = true;
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = a.text;
    card.append(key, badge, text);
    card.addEventListener("click", () => toggleAnswer(a.id));
    return card;
  }));
  renderRanking();
}

// ---- ranking --------------------------------------------------------------------------------

function answerLabel(id) {
  const k = state.assignment.item.answers.findIndex((a) => a.id === id);
  return `Answer ${k + 1}`;
}

function rankOf(id) { return state.groups.findIndex((g) => g.includes(id)); }

function toggleAnswer(id) {
  const r = rankOf(id);
  if (r >= 0) {
    state.groups[r] = state.groups[r].filter((x) => x !== id);
    state.groups = state.groups.filter((g) => g.length);
  } else if (state.tieMode && state.groups.length) {
    state.groups[state.groups.length - 1].push(id);
  } else {
    state.groups.push([id]);
  }
  state.tieMode = false;
  renderRanking();
}

function undoLast() {
  const last = state.groups[state.groups.length - 1];
  if (!last) return;
  last.pop();
  state.groups = state.groups.filter((g) => g.length);
  renderRanking();
}

function moveGroup(from, to) {
  const [g] = state.groups.splice(from, 1);
  state.groups.splice(to, 0, g);
  renderRanking();
}

function tieWithAbove(index) {
  state.groups[index - 1].push(...state.groups[index]);
  state.groups.splice(index, 1);
  renderRanking();
}

function isComplete() {
  return state.assignment && state.groups.flat().length === state.assignment.item.answers.length;
}

function renderRanking() {
  for (const card of document.querySelectorAll(".answer")) {
    const r = rankOf(Number(card.dataset.answerId));
    card.classList.toggle("ranked", r >= 0);
    const badge = card.querySelector(".badge");
    badge.hidden = r < 0;
    badge.textContent = r >= 0 ? `#${r + 1}` : "";
  }
  const list = $("ranking");
  list.replaceChildren(...state.groups.map((g, i) => {
    const li = document.createElement("li");
    li.draggable = true;
    li.dataset.index = i;
    li.textContent = g.map(answerLabel).join(" = ");
    if (g.length > 1) {
      const tied = document.createElement("span");
      tied.className = "tied";
      tied.textContent = "(tie)";
      li.append(tied);
    }
    if (i > 0) {
      const tie = document.createElement("button");
      tie.type = "button";
      tie.className = "tie-up";
      tie.textContent = "tie with above";
      tie.addEventListener("click", (ev) => { ev.stopPropagation(); tieWithAbove(i); });
      li.append(" ", tie);
    }
    li.addEventListener("dragstart", (ev) => { ev.dataTransfer.setData("text/plain", String(i)); ev.dataTransfer.effectAllowed = "move"; });
    li.addEventListener("dragover", (ev) => { ev.preventDefault(); li.classList.add("over"); });
    li.addEventListener("dragleave", () => li.classList.remove("over"));
    li.addEventListener("drop", (ev) => {
      ev.preventDefault();
      const from = Number(ev.dataTransfer.getData("text/plain"));
      if (!Number.isNaN(from) && from !== i) moveGroup(from, i);
    });
    return li;
  }));
  $("tie-mode").checked = state.tieMode;
  $("submit").disabled = !isComplete() || state.busy;
}

async function submit() {
  if (!isComplete() || state.busy) return;
  state.busy = true;
  const itemId = state.assignment.item.id;
  const body = { ranking: state.groups.map((g) => (g.length === 1 ? g[0] : g)) };
  const rationale = $("rationale").value.trim();
  if (rationale) body.rationale = rationale;
  try {
    const r = await api("POST", `/api/v1/items/${itemId}/rankings`, body);
    showError(null);
    showStatus(`Saved ranking #${r.id} for item #${itemId}.`);
    await nextItem();
  } catch (e) {
    showError(e);
    // 409: the lease expired and the item went to someone else (or it was ranked elsewhere): move on.
    if (e.status === 409) await nextItem().catch(showError);
  } finally {
    state.busy = false;
    renderRanking();
  }
}

async function skip() {
  if (!state.assignment || state.busy) return;
  const itemId = state.assignment.item.id;
  try {
    await api("POST", `/api/v1/items/${itemId}/skip`);
    showError(null);
    showStatus(`Skipped item #${itemId}.`);
    await nextItem();
  } catch (e) {
    showError(e);
  }
}

// ---- wiring ---------------------------------------------------------------------------------

$("signin-form").addEventListener("submit", (ev) => { ev.preventDefault(); signIn($("token").value.trim()); });
$("signout").addEventListener("click", () => signOut());
$("campaign").addEventListener("change", (ev) => selectCampaign(ev.target.value).catch(showError));
$("submit").addEventListener("click", submit);
$("skip").addEventListener("click", skip);
$("clear").addEventListener("click", () => { state.groups = []; renderRanking(); });
$("tie-mode").addEventListener("change", (ev) => { state.tieMode = ev.target.checked; });

document.addEventListener("keydown", (ev) => {
  if (!state.assignment || $("work-panel").hidden) return;
  const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement?.tagName);
  if (typing && !(ev.key === "Enter" && (ev.ctrlKey || ev.metaKey))) return;
  const answers = state.assignment.item.answers;
  if (/^[1-9]$/.test(ev.key) && Number(ev.key) <= answers.length) {
    toggleAnswer(answers[Number(ev.key) - 1].id);
  } else if (ev.key === "t" || ev.key === "T") {
    state.tieMode = !state.tieMode;
    renderRanking();
  } else if (ev.key === "Backspace") {
    undoLast();
  } else if (ev.key === "c" || ev.key === "C") {
    state.groups = [];
    renderRanking();
  } else if (ev.key === "Enter") {
    submit();
  } else if (ev.key === "s" || ev.key === "S") {
    skip();
  } else {
    return;
  }
  ev.preventDefault();
});

const saved = sessionStorage.getItem("alignloop-token");
if (saved) signIn(saved);
