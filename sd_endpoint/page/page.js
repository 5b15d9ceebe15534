// The playground page. The form is built from the request model's JSON schema
// (/playground/request.json), so every field of the request shows with the model's own limits,
// default and help text. Requests go to this origin only; a token typed by the user is kept in
// this tab's sessionStorage and nowhere else.
"use strict";

const TOKEN_KEY = "sd-endpoint-token";
const URL_KEY = "sd-endpoint-url";
const MEDIA = { png: "image/png", jpeg: "image/jpeg", webp: "image/webp" };
const EXTENSION = { png: "png", jpeg: "jpg", webp: "webp" };
const DEFAULT_RETRY_SECONDS = 5;

const $ = (id) => document.getElementById(id);
const fields = new Map(); // name -> {spec, input, error}
let aliases = {}; // older name -> field name
let busy = null; // {controller, timer, started, note} while a request is on its way
let shown = null; // the entry ({body, result}) on display
let awaitingToken = false; // a request refused with 401, to send again once a token is typed

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "className") node.className = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children);
  return node;
}

// --- the form, from the schema -----------------------------------------------------------------

function resolve(schema, defs) {
  if (schema && schema.$ref) return resolve(defs[schema.$ref.split("/").pop()] || {}, defs);
  return schema || {};
}

// One field's JSON schema, flattened: pydantic writes an optional field as anyOf [T, null].
function describe(name, property, required, defs) {
  const own = resolve(property, defs);
  const branches = (own.anyOf || own.oneOf || [own]).map((s) => resolve(s, defs));
  const value = branches.find((s) => s.type !== "null") || {};
  const spec = { ...value, ...own, name, required, nullable: branches.some((s) => s.type === "null") };
  delete spec.anyOf;
  delete spec.oneOf;
  if (spec.const !== undefined && !spec.enum) spec.enum = [spec.const];
  return spec;
}

function labelOf(spec) {
  if (spec.name === "inputs") return "Prompt";
  return (spec.title || spec.name.replace(/_/g, " ")).replace(/^(\w)/, (c) => c.toUpperCase());
}

function control(spec) {
  const id = `field-${spec.name}`;
  const common = {
    id, name: spec.name, "aria-describedby": `help-${spec.name} error-${spec.name}`, "aria-required": spec.required,
  };
  if (spec.enum) {
    const select = element("select", common);
    if (spec.nullable || spec.default === undefined) select.append(element("option", { value: "" }, "(default)"));
    for (const option of spec.enum) select.append(element("option", { value: String(option) }, String(option)));
    select.value = spec.default === undefined || spec.default === null ? "" : String(spec.default);
    return select;
  }
  if (spec.type === "string") {
    const long = spec.name === "inputs" || /prompt/.test(spec.name) || (spec.maxLength || 0) > 200;
    const input = long
      ? element("textarea", { ...common, rows: spec.name === "inputs" ? 3 : 2, maxlength: spec.maxLength })
      : element("input", { ...common, type: "text", maxlength: spec.maxLength });
    const example = (spec.examples || [])[0];
    if (spec.name === "inputs" && example) input.value = example;
    else if (typeof spec.default === "string") input.value = spec.default;
    if (example) input.placeholder = example;
    return input;
  }
  if (spec.type === "boolean") {
    if (spec.nullable && (spec.default === null || spec.default === undefined)) {
      const select = element("select", common);
      select.append(element("option", { value: "" }, "(default)"), element("option", { value: "true" }, "true"),
        element("option", { value: "false" }, "false"));
      return select;
    }
    const box = element("input", { ...common, type: "checkbox" });
    box.checked = spec.default === true;
    return box;
  }
  if (spec.type === "integer" || spec.type === "number") {
    const step = spec.multipleOf || (spec.type === "integer" ? 1 : "any");
    const input = element("input", {
      ...common, type: "number", inputmode: spec.type === "integer" ? "numeric" : "decimal",
      min: spec.minimum ?? spec.exclusiveMinimum, max: spec.maximum ?? spec.exclusiveMaximum, step,
    });
    if (spec.default !== undefined && spec.default !== null) input.value = String(spec.default);
    else input.placeholder = spec.name === "seed" ? "random" : "default";
    return input;
  }
  if (spec.type === "object" && spec.propertyNames && spec.propertyNames.enum) return picker(spec);
  // Anything else (a list, an object): JSON typed by hand.
  const input = element("input", { ...common, type: "text", placeholder: "JSON" });
  if (spec.default !== undefined && spec.default !== null) input.value = JSON.stringify(spec.default);
  return input;
}

// An object whose names the schema lists (the server's LoRAs): a box per name to pick it, with
// its number (the weight) beside it. Typing a weight picks the name.
function picker(spec) {
  const names = spec.propertyNames.enum;
  const number = spec.additionalProperties || {};
  const list = element("div", {
    id: `field-${spec.name}`, className: "picker", role: "group", "aria-describedby": `help-${spec.name} error-${spec.name}`,
  });
  const rows = new Map();
  if (names.length === 0) list.append(element("p", { className: "help" }, "none on this server"));
  names.forEach((name, i) => {
    const box = element("input", { type: "checkbox", id: `pick-${spec.name}-${i}`, value: name });
    const weight = element("input", {
      type: "number", className: "weight", min: number.minimum, max: number.maximum, step: "0.05",
      inputmode: "decimal", "aria-label": `${name}: weight`,
    });
    weight.value = "1";
    weight.addEventListener("input", () => { box.checked = true; });
    list.append(element("div", { className: "row pick" }, box, element("label", { for: box.id }, name), weight));
    rows.set(name, { box, weight });
  });
  list.read = () => {
    const picked = {};
    for (const [name, { box, weight }] of rows) {
      if (box.checked) picked[name] = weight.value.trim() === "" ? 1 : Number(weight.value);
    }
    return Object.keys(picked).length ? picked : undefined;
  };
  list.write = (value) => {
    for (const [name, { box, weight }] of rows) {
      const given = value && typeof value === "object" ? value[name] : undefined;
      box.checked = given !== undefined;
      weight.value = String(given ?? 1);
    }
  };
  list.focus = () => { const first = list.querySelector("input"); if (first) first.focus(); };
  return list;
}

// A slider beside a bounded number with a default, kept in step with the number box.
function slider(spec, input) {
  const { minimum: min, maximum: max } = spec;
  const step = spec.multipleOf || (spec.type === "integer" ? 1 : 0.5);
  if (min === undefined || max === undefined || spec.nullable || (max - min) / step > 1000) return null;
  const range = element("input", { type: "range", min, max, step, tabindex: "-1", "aria-hidden": "true" });
  range.value = input.value;
  range.addEventListener("input", () => { input.value = range.value; clearError(spec.name); });
  input.addEventListener("input", () => { if (input.value !== "") range.value = input.value; });
  input.slider = range;
  return range;
}

function buildForm(described) {
  const schema = described.request;
  aliases = described.aliases || {};
  const defs = schema.$defs || {};
  const required = new Set(schema.required || []);
  const container = $("fields");
  container.replaceChildren();
  for (const [name, property] of Object.entries(schema.properties || {})) {
    const spec = describe(name, property, required.has(name), defs);
    const input = control(spec);
    const label = element("label", { for: input.id }, labelOf(spec), " ", element("code", {}, name));
    const row = element("div", { className: "row" }, input);
    if (name === "seed") {
      const mode = element("select", { id: "seed-mode", "aria-label": "seed mode" },
        element("option", { value: "random" }, "random"),
        element("option", { value: "keep" }, "keep"));
      input.addEventListener("input", () => { mode.value = input.value === "" ? "random" : "keep"; });
      row.append(mode);
    } else {
      const range = slider(spec, input);
      if (range) row.prepend(range);
    }
    const help = element("p", { className: "help", id: `help-${name}` }, spec.description || "");
    const error = element("p", { className: "field-error", id: `error-${name}`, role: "alert", hidden: true });
    const box = element("div", { className: "field", id: `box-${name}` });
    if (input.tagName === "TEXTAREA" || input.read) box.classList.add("wide");
    if (input.type === "checkbox") box.append(element("label", {}, input, " ", labelOf(spec), " ", element("code", {}, name)));
    else box.append(label, row);
    box.append(help, error);
    input.addEventListener("input", () => clearError(name));
    container.append(box);
    fields.set(name, { spec, input, error, box });
  }
}

function randomSeed() {
  return $("seed-mode") !== null && $("seed-mode").value === "random";
}

function valueOf({ spec, input }) {
  if (input.read) return input.read();
  if (input.type === "checkbox") return input.checked;
  const text = input.value.trim();
  if (text === "") return undefined;
  if (spec.type === "boolean") return text === "true";
  if (spec.enum) return spec.enum.find((option) => String(option) === input.value);
  if (spec.type === "integer" || spec.type === "number") return Number(text);
  if (spec.type === "string") return input.value;
  try { return JSON.parse(text); } catch { return text; } // the server says what is wrong
}

// The body in Hugging Face's standard form, which the deployed endpoint takes as it is. A value
// equal to the model's default is left out: the request means the same, and reads shorter.
function requestBody() {
  const parameters = {};
  let inputs = "";
  for (const [name, field] of fields) {
    if (name === "seed" && randomSeed()) continue;
    const value = valueOf(field);
    if (value === undefined || (name !== "inputs" && value === field.spec.default)) continue;
    if (name === "inputs") inputs = value;
    else parameters[name] = value;
  }
  return { inputs, parameters };
}

function asText(value, none = "") {
  if (value === undefined || value === null) return none;
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function restore(body, seed) {
  const values = { inputs: body.inputs, ...body.parameters };
  for (const [name, { spec, input }] of fields) {
    const value = name === "seed" ? seed : values[name];
    if (input.write) input.write(value);
    else if (input.type === "checkbox") input.checked = value === undefined ? spec.default === true : Boolean(value);
    else input.value = asText(value === undefined ? spec.default : value);
    if (input.slider) input.slider.value = input.value;
  }
  if ($("seed-mode")) $("seed-mode").value = "keep";
  clearErrors();
}

// --- errors beside their fields ----------------------------------------------------------------

function clearError(name) {
  const field = fields.get(name);
  if (!field) return;
  field.error.hidden = true;
  field.error.textContent = "";
  field.input.removeAttribute("aria-invalid");
}

function clearErrors() {
  for (const name of fields.keys()) clearError(name);
  $("error").hidden = true;
}

// The server's messages name fields in backticks: "invalid request: `width` should be ...".
// Each clause goes to the first field it names; returns whether every clause found its field.
function placeErrors(message) {
  const clauses = message.replace(/^invalid request:\s*/, "").split(/;\s+(?=`)/);
  let first = null;
  let placed = 0;
  for (const clause of clauses) {
    const named = [...clause.matchAll(/`([^`]+)`/g)]
      .map((match) => aliases[match[1]] || match[1])
      .find((name) => fields.has(name));
    if (!named) continue;
    const field = fields.get(named);
    field.error.textContent = field.error.hidden ? clause : `${field.error.textContent}; ${clause}`;
    field.error.hidden = false;
    field.input.setAttribute("aria-invalid", "true");
    first = first || field;
    placed += 1;
  }
  if (first) first.input.focus();
  return placed === clauses.length;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = false;
}

// --- talking to the server ---------------------------------------------------------------------

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function showTokenState() {
  $("token-state").hidden = !token();
}

// Relative URLs only: the token goes to the origin that served this page and nowhere else.
async function post(body, signal) {
  const headers = { "Content-Type": "application/json", Accept: "application/json" };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  return fetch("/", { method: "POST", headers, body: JSON.stringify(body), signal, credentials: "same-origin" });
}

async function messageOf(response) {
  const text = await response.text();
  try { return JSON.parse(text).error || text; } catch { return text || response.statusText; }
}

function sleep(seconds, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, seconds * 1000);
    signal.addEventListener("abort", () => { clearTimeout(timer); reject(signal.reason); }, { once: true });
  });
}

function setStatus(text) {
  $("status").textContent = text;
}

function startWorking() {
  const controller = new AbortController();
  const started = performance.now();
  const tick = () => {
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    setStatus(`${busy.note || "working…"} ${seconds} s`);
  };
  busy = { controller, started, note: "" };
  busy.timer = setInterval(tick, 100);
  tick();
  $("generate").disabled = true;
  $("cancel").hidden = false;
  $("request").setAttribute("aria-busy", "true");
  return busy;
}

function stopWorking(status) {
  if (busy) clearInterval(busy.timer);
  busy = null;
  $("generate").disabled = false;
  $("cancel").hidden = true;
  $("request").removeAttribute("aria-busy");
  setStatus(status);
}

async function generate() {
  if (busy) return;
  clearErrors();
  $("token-form").hidden = true;
  const body = requestBody();
  const work = startWorking();
  try {
    for (;;) {
      const response = await post(body, work.controller.signal);
      if (response.ok) {
        const result = await response.json();
        const seconds = (performance.now() - work.started) / 1000;
        stopWorking(`done in ${seconds.toFixed(1)} s`);
        const entry = { body, result };
        // Shown in the seed box, so that "keep" makes this image again.
        if (randomSeed()) fields.get("seed").input.value = String(result.seed);
        show(entry);
        addThumbnail(entry);
        return;
      }
      const message = await messageOf(response);
      if (response.status === 503 && response.headers.has("Retry-After")) {
        const wait = Number(response.headers.get("Retry-After")) || DEFAULT_RETRY_SECONDS;
        work.note = `the model is loading; trying again every ${wait} s…`;
        await sleep(wait, work.controller.signal);
        continue;
      }
      if (response.status === 401) {
        stopWorking("needs a token");
        askForToken(message);
        return;
      }
      stopWorking(`HTTP ${response.status}`);
      showError(placeErrors(message) ? "see the message beside the field marked in red" : message);
      return;
    }
  } catch (error) {
    if (work.controller.signal.aborted) {
      stopWorking("cancelled");
    } else {
      stopWorking("no answer");
      showError(`could not reach the server (${error.message}); is it still running?`);
    }
  }
}

function askForToken(message) {
  awaitingToken = true;
  $("token-message").textContent = message;
  $("token-form").hidden = false;
  $("token").value = "";
  $("token").focus();
}

// --- showing results ---------------------------------------------------------------------------

function imagesOf(result) {
  const images = Array.isArray(result.images) && result.images.length ? result.images : [result.image];
  const seeds = Array.isArray(result.seeds) && result.seeds.length ? result.seeds : [result.seed];
  const format = (result.parameters && result.parameters.output_format) || "png";
  return images.map((data, i) => {
    const seed = seeds[i] ?? seeds[0];
    const name = seeds[i] === undefined && i > 0 ? `sd-${seed}-${i + 1}` : `sd-${seed}`;
    return { src: `data:${MEDIA[format] || "image/png"};base64,${data}`, seed, filename: `${name}.${EXTENSION[format] || format}` };
  });
}

function markShown() {
  for (const button of document.querySelectorAll("#history button")) {
    button.setAttribute("aria-pressed", String(button.entry === shown));
  }
}

function show(entry) {
  shown = entry;
  const { result } = entry;
  const figures = imagesOf(result).map(({ src, seed, filename }) => {
    const image = element("img", { src, alt: `generated image, seed ${seed}` });
    image.addEventListener("load", () => image.classList.toggle("pixelated", image.naturalWidth < 256), { once: true });
    return element("figure", {}, image,
      element("figcaption", {}, "seed ", element("span", { className: "seed" }, String(seed)), " · ",
        element("a", { href: src, download: filename, className: "download" }, "Download")));
  });
  $("images").replaceChildren(...figures);
  $("warnings").replaceChildren(...(result.warnings || []).map((w) => element("li", {}, w)));
  const used = Object.entries(result.parameters || {}).flatMap(([name, value]) => [
    element("dt", {}, name), element("dd", {}, asText(value, "none")),
  ]);
  $("used").replaceChildren(...used);
  $("result").hidden = false;
  markShown();
  renderSnippets();
}

function addThumbnail(entry) {
  const [first] = imagesOf(entry.result);
  const button = element("button", { type: "button", title: `${entry.body.inputs} · seed ${first.seed}` },
    element("img", { src: first.src, alt: `seed ${first.seed}` }));
  button.entry = entry;
  button.addEventListener("click", () => {
    restore(entry.body, entry.result.seed);
    show(entry);
    setStatus("settings restored");
  });
  $("history").prepend(element("li", {}, button));
  $("history-section").hidden = false;
  markShown();
}

// --- copy as curl / Python ---------------------------------------------------------------------

function shellQuote(text) {
  return `'${text.replace(/'/g, `'\\''`)}'`;
}

function python(value, indent = "") {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) return `[${value.map((v) => python(v, indent)).join(", ")}]`;
  if (typeof value === "object") {
    const inner = `${indent}    `;
    const items = Object.entries(value).map(([k, v]) => `${inner}${JSON.stringify(k)}: ${python(v, inner)},`);
    return items.length ? `{\n${items.join("\n")}\n${indent}}` : "{}";
  }
  return JSON.stringify(value); // numbers, and strings: JSON's escapes are Python's too
}

// The request that made the image on display, with its seed, so that it reproduces the image.
function snippetBody() {
  if (!shown) return requestBody();
  const parameters = { ...shown.body.parameters, seed: shown.result.seed };
  return { inputs: shown.body.inputs, parameters };
}

function renderSnippets() {
  const url = $("endpoint-url").value.trim() || `${location.origin}/`;
  const body = snippetBody();
  $("curl").textContent = [
    `curl ${shellQuote(url)} \\`,
    `  -H "Authorization: Bearer $HF_TOKEN" \\`,
    "  -H 'Content-Type: application/json' \\",
    `  -d ${shellQuote(JSON.stringify(body))}`,
  ].join("\n");
  const format = body.parameters.output_format || "png";
  $("python").textContent = [
    "import base64",
    "import os",
    "",
    "import requests",
    "",
    "response = requests.post(",
    `    ${JSON.stringify(url)},`,
    `    headers={"Authorization": f"Bearer {os.environ['HF_TOKEN']}"},`,
    `    json=${python(body, "    ")},`,
    ")",
    "if not response.ok:",
    "    raise SystemExit(f\"HTTP {response.status_code}: {response.text}\")",
    "result = response.json()",
    "images = result.get(\"images\") or [result[\"image\"]]",
    "seeds = result.get(\"seeds\") or [result[\"seed\"]]",
    "for image, seed in zip(images, seeds):",
    `    with open(f"sd-{seed}.${EXTENSION[format] || format}", "wb") as file:`,
    "        file.write(base64.b64decode(image))",
    "    print(\"wrote\", file.name)",
  ].join("\n");
}

async function copy(target) {
  const text = $(target).textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("copied").textContent = `copied the ${target === "curl" ? "curl command" : "Python code"}`;
  } catch {
    // No clipboard API (a page not on localhost or https): select it for Ctrl+C.
    const range = document.createRange();
    range.selectNodeContents($(target));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    $("copied").textContent = "selected: press Ctrl+C to copy";
  }
}

// --- health --------------------------------------------------------------------------------------

async function watchHealth() {
  for (;;) {
    let wait = 2;
    try {
      const response = await fetch("/health", { headers: { Accept: "application/json" } });
      if (response.ok) {
        $("health").textContent = "model loaded";
        $("health").className = "ready";
        return;
      }
      $("health").textContent = await messageOf(response);
      $("health").className = "waiting";
      wait = Number(response.headers.get("Retry-After")) || wait;
    } catch {
      $("health").textContent = "the server is not answering";
      $("health").className = "waiting";
    }
    await new Promise((resolve) => setTimeout(resolve, wait * 1000));
  }
}

// --- wiring --------------------------------------------------------------------------------------

async function start() {
  $("request").addEventListener("submit", (event) => { event.preventDefault(); generate(); });
  $("cancel").addEventListener("click", () => busy && busy.controller.abort());
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      generate();
    } else if (event.key === "Escape" && busy) {
      busy.controller.abort();
    }
  });
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    $("token-form").hidden = true;
    showTokenState();
    if (awaitingToken) {
      awaitingToken = false;
      generate();
    }
  });
  $("forget-token").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); showTokenState(); });
  $("endpoint-url").value = localStorage.getItem(URL_KEY) || `${location.origin}/`;
  $("endpoint-url").addEventListener("input", () => {
    localStorage.setItem(URL_KEY, $("endpoint-url").value.trim());
    renderSnippets();
  });
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", () => copy(button.dataset.target));
  }
  showTokenState();
  watchHealth();
  try {
    const response = await fetch("/playground/request.json");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    buildForm(await response.json());
    document.body.dataset.ready = "true";
  } catch (error) {
    $("fields").replaceChildren(element("p", { className: "error" }, `could not load the request form: ${error.message}`));
  }
}

start();
