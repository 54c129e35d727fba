// progsae dashboard: calls to the server. With a server token every /api call sends it; a 401
// asks for it (kept in sessionStorage, so once per browser session). Loaded before app.js.
"use strict";

const TOKEN_KEY = "progsae-token";

// --- errors -----------------------------------------------------------------------------------

function showError(msg) {
  const box = $("error");
  box.textContent = msg;
  box.hidden = false;
}
function clearError() { $("error").hidden = true; $("error").textContent = ""; }
function unreachable(e) {
  return `Cannot reach the progsae server (${e.message || e}). Is it running? Start it with \`progsae serve\`.`;
}

// --- auth: with a server token, every /api call sends it; a 401 asks for it (once a session) ---

class AuthError extends Error {}

function api(url, opts = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = { ...(opts.headers || {}), ...(token ? { Authorization: `Bearer ${token}` } : {}) };
  return fetch(url, { ...opts, headers });
}

async function failure(resp, url) {
  const body = await resp.json().catch(() => null);
  const msg = body && body.message ? body.message : `HTTP ${resp.status} from ${url}`;
  return resp.status === 401 ? new AuthError(msg) : new Error(msg);
}

function askToken(reason) {
  const had = sessionStorage.getItem(TOKEN_KEY);
  sessionStorage.removeItem(TOKEN_KEY);
  $("auth-msg").textContent = had ? `The server refused that token (${reason}).` : "This server needs a token.";
  $("auth").hidden = false;
  $("auth-token").focus();
}

async function getJSON(url) {
  let resp;
  try { resp = await api(url); } catch (e) { throw new Error(unreachable(e)); }
  if (!resp.ok) throw await failure(resp, url);
  return resp.json();
}
