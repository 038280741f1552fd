// A hostile web page in a real Chromium (playwright-core, Debian's
// chromium) tries to drive a Hearth node on loopback with the requests a
// browser sends across sites without asking first: a bodiless POST that
// unloads the model and a multipart upload, each by fetch(no-cors) and by
// a form submitted by the page. The page is served from two other origins
// on loopback: `localhost` on another port (another site) and the node's
// own address on another port (the same site, another origin).
// Usage: node cross_site.mjs NODE_BASE_URL
// Prints one JSON object: what each page did.
import http from "node:http";
import { chromium } from "playwright-core";

const [base] = process.argv.slice(2);

const page = (target) => `<!doctype html><meta charset="utf-8"><title>hostile</title>
<form id="unload" method="post" action="${target}/api/models/unload" target="sink"></form>
<form id="upload" method="post" action="${target}/v1/files" enctype="multipart/form-data" target="sink">
  <input name="purpose" value="fine-tune"><textarea name="file">{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}</textarea>
</form>
<iframe name="sink"></iframe>
<script>
window.attack = async () => {
  const out = [];
  try {
    await fetch("${target}/api/models/unload", { method: "POST", mode: "no-cors" });
    out.push("fetch unload sent");
  } catch (e) { out.push("fetch unload: " + e); }
  const fd = new FormData();
  fd.append("purpose", "fine-tune");
  fd.append("file", new Blob(['{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}\\n']), "x.jsonl");
  try {
    await fetch("${target}/v1/files", { method: "POST", mode: "no-cors", body: fd });
    out.push("fetch upload sent");
  } catch (e) { out.push("fetch upload: " + e); }
  for (const id of ["unload", "upload"]) {
    document.getElementById(id).submit();
    await new Promise((r) => setTimeout(r, 1000));
    out.push("form " + id + " submitted");
  }
  return out;
};
</script>`;

const server = http.createServer((req, res) => {
  res.writeHead(200, { "content-type": "text/html" });
  res.end(page(base));
});
await new Promise((r) => server.listen(0, "127.0.0.1", r));
const port = server.address().port;

const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
const result = { pages: [] };
try {
  for (const origin of [`http://localhost:${port}`, `http://127.0.0.1:${port}`]) {
    const p = await browser.newPage();
    await p.goto(origin + "/", { waitUntil: "load" });
    const did = await p.evaluate(() => window.attack());
    result.pages.push({ origin, did });
    await p.close();
  }
} finally {
  await browser.close();
  server.close();
}
console.log(JSON.stringify(result));
