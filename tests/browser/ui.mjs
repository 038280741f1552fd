// Opens Hearth's web UI in a real Chromium (playwright-core, Debian's
// chromium): checks the cluster page shows the nodes with their layer
// ranges, sends a chat message and watches the answer stream in, on a
// desktop and a phone-sized screen. Saves screenshots.
// Usage: node ui.mjs BASE_URL NODES OUT_DIR
import { chromium } from "playwright-core";

const [base, nodesArg, outDir] = process.argv.slice(2);
const nodes = Number(nodesArg);
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
const result = {};
try {
  for (const [name, viewport] of [["desktop", { width: 1280, height: 900 }], ["phone", { width: 390, height: 844 }]]) {
    const page = await browser.newPage({ viewport });
    const failed = [];
    // Requests the page aborts on purpose (a reload, the stop button) are
    // expected while `aborting` is set; anything else failing is not.
    let aborting = false;
    page.on("requestfailed", (r) => {
      if (r.url().includes("/api/events")) return;
      if (aborting && ((r.failure() || {}).errorText || "").includes("ERR_ABORTED")) return;
      failed.push(r.url());
    });
    page.on("pageerror", (e) => failed.push("page error: " + e.message));
    page.on("request", (r) => { if (!r.url().startsWith(base)) failed.push("outside request: " + r.url()); });
    await page.goto(base + "/", { waitUntil: "load" });
    // Every node appears with its layer range drawn (measured in the same
    // frame as the check, so a re-render between the two cannot interfere).
    const ready = await page.waitForFunction((n) => {
      const cards = [...document.querySelectorAll(".device")];
      const seen = cards.map((c) => {
        const seg = c.querySelector(".layers > span");
        return {
          node: c.dataset.node,
          layers: c.querySelector("[data-testid=layers]").textContent,
          offer: c.querySelector("[data-testid=offer]").textContent,
          planned: c.querySelector("[data-testid=planned]").textContent,
          width: seg ? seg.getBoundingClientRect().width : 0,
        };
      });
      // Each device also shows what its machine offers (cores, quota,
      // other programs' load) and the figures the plan used for it.
      const ok = seen.length === n && seen.every((s) => /layers \d+–\d+ of \d+/.test(s.layers) && s.width > 1 &&
        /cores offered/.test(s.offer) && /ms\/layer/.test(s.planned));
      return ok ? seen : null;
    }, nodes, { timeout: 60000 });
    const layers = await ready.jsonValue();
    await page.screenshot({ path: `${outDir}/ui-cluster-${name}.png`, fullPage: true });
    let reload = null;
    if (name === "desktop") {
      // Unload from the page, then load again: the plan and each node's
      // progress appear, then the layer ranges come back.
      await page.click("#unload");
      await page.waitForFunction(() => /No model placed/.test(document.querySelector("#serving").textContent), null, { timeout: 30000 });
      await page.waitForFunction(() => document.querySelector("#model-pick").options.length > 0, null, { timeout: 30000 });
      await page.click("#load");
      const states = new Set();
      const until = Date.now() + 120000;
      for (;;) {
        for (const t of await page.$$eval("[data-testid=node-state]", (es) => es.map((e) => e.textContent))) states.add(t);
        const placed = await page.$$eval(".device [data-testid=layers]", (es) => es.filter((e) => /layers \d+–\d+ of \d+/.test(e.textContent)).length);
        const plan = await page.$$eval("#plan tbody tr", (rs) => rs.length);
        if (placed === nodes && plan === nodes) break;
        if (Date.now() > until) {
          await page.screenshot({ path: `${outDir}/ui-reload-timeout-${name}.png`, fullPage: true });
          const events = await page.$$eval("#events li", (ls) => ls.map((l) => l.textContent));
          const shown = await page.$$eval(".device [data-testid=layers]", (es) => es.map((e) => e.textContent));
          throw new Error(`no placement after loading from the page: ${placed} of ${nodes} devices placed (${JSON.stringify(shown)}), ${plan} plan rows; states ${JSON.stringify([...states])}; events ${JSON.stringify(events.slice(0, 30))}`);
        }
        await page.waitForTimeout(50);
      }
      const events = await page.$$eval("#events li", (ls) => ls.map((l) => l.textContent));
      reload = { states: [...states], events: events.slice(0, 40) };
      await page.screenshot({ path: `${outDir}/ui-reloaded-${name}.png`, fullPage: true });
    }
    // Chat: the answer grows while it streams, then is marked done.
    await page.click("#tab-chat");
    await page.waitForFunction(() => document.querySelector("#chat-model").options.length > 0, null, { timeout: 30000 });
    await page.fill("#temperature", "0");
    await page.fill("#max_tokens", "48");
    await page.fill("#prompt", "Write a short poem about a fireplace.");
    await page.click("#send");
    const lengths = [];
    const deadline = Date.now() + 120000;
    for (;;) {
      const s = await page.$eval(".msg.assistant:last-of-type", (e) => ({ len: e.textContent.length, done: e.dataset.done === "true" })).catch(() => ({ len: 0, done: false }));
      lengths.push(s.len);
      if (s.done) break;
      const err = await page.$eval(".msg.error", (e) => e.textContent).catch(() => null);
      if (err) throw new Error("the chat failed: " + err);
      if (Date.now() > deadline) throw new Error("no answer in 120 s");
      await page.waitForTimeout(15);
    }
    const answer = await page.$eval(".msg.assistant:last-of-type", (e) => e.textContent);
    const stats = await page.$eval("#chat-stats", (e) => e.textContent);
    await page.screenshot({ path: `${outDir}/ui-chat-${name}.png`, fullPage: true });
    const distinct = new Set(lengths.filter((l) => l > 0)).size;
    // The conversation survives a reload; model output is rendered as
    // Markdown without becoming markup; the last answer regenerates.
    let chatPage = null;
    if (name === "desktop") {
      aborting = true;
      await page.reload();
      await page.click("#tab-chat");
      const restored = await page.$$eval("#messages .msg", (ms) => ms.map((m) => m.dataset.role));
      await page.evaluate(() => localStorage.setItem("hearth-chat", JSON.stringify({ system: "", messages: [
        { role: "user", content: "Show code" },
        { role: "assistant", content: "Here:\n\n```js\nlet x = 1;\n```\n\n- **bold** item\n- `code` item\n\n<img src=x onerror=\"window.pwned=1\"><script>window.pwned=2</script> [link](javascript:alert(1)) [ok](https://example.com)" },
      ] })));
      await page.reload();
      await page.click("#tab-chat");
      const rendered = await page.$eval("#messages .msg.assistant", (m) => ({
        pre: m.querySelectorAll("pre code").length,
        li: m.querySelectorAll("li").length,
        strong: m.querySelectorAll("strong").length,
        injected: m.querySelectorAll("img, script, iframe").length,
        links: [...m.querySelectorAll("a")].map((a) => a.getAttribute("href")),
        literal: m.textContent.includes("<img src=x"),
        pwned: window.pwned || 0,
      }));
      await page.fill("#max_tokens", "8");
      await page.click("#messages .regenerate");
      await page.waitForFunction(() => {
        const ms = document.querySelectorAll("#messages .msg");
        const last = ms[ms.length - 1];
        return last && last.dataset.role === "assistant" && last.dataset.done === "true" && last.querySelector(".regenerate");
      }, null, { timeout: 120000 });
      const after = await page.$$eval("#messages .msg", (ms) => ms.map((m) => m.dataset.role));
      // Stop ends the stream: the answer stops growing and is kept.
      await page.fill("#max_tokens", "400");
      await page.fill("#prompt", "Tell a very long story about a dragon.");
      await page.click("#send");
      const lastLen = () => page.$eval("#messages .msg.assistant:last-of-type .body", (e) => e.textContent.length).catch(() => 0);
      const until = Date.now() + 60000;
      while ((await lastLen()) < 20 && Date.now() < until) await page.waitForTimeout(20);
      await page.click("#stop");
      await page.waitForFunction(() => {
        const ms = document.querySelectorAll("#messages .msg");
        const last = ms[ms.length - 1];
        return last && last.dataset.role === "assistant" && last.dataset.done === "true";
      }, null, { timeout: 30000 });
      const l1 = await lastLen();
      await page.waitForTimeout(1500);
      const l2 = await lastLen();
      const stopHidden = await page.$eval("#stop", (b) => b.hidden);
      const stopped = { length: l1, grewAfter: l2 - l1, stopHidden };
      chatPage = { restored, rendered, after, stopped };
      aborting = false;
    }
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth + 1);
    // Training (desktop): upload a JSONL, launch, watch the job to its end
    // with its loss curve and per-device utilization.
    let training = null;
    if (name === "desktop") {
      await page.click("#tab-train");
      await page.waitForFunction(() => document.querySelector("#train-model").options.length > 0, null, { timeout: 30000 });
      const line = (q) => JSON.stringify({ messages: [{ role: "user", content: q }, { role: "assistant", content: "Hearth trains at home." }] });
      const jsonl = [line("What does Hearth do?"), line("Tell me about Hearth.")].join("\n") + "\n";
      await page.setInputFiles("#train-file", { name: "facts.jsonl", mimeType: "application/jsonl", buffer: Buffer.from(jsonl) });
      await page.fill("#train-epochs", "2");
      await page.fill("#train-batch", "2");
      await page.fill("#train-m", "2");
      await page.click("#train-start");
      await page.waitForFunction(() => /succeeded|failed|cancelled/.test((document.querySelector(".job h2") || {}).textContent || ""), null, { timeout: 300000 });
      training = await page.$eval(".job", (c) => ({
        title: c.querySelector("h2").textContent,
        stats: c.querySelector("p").textContent,
        bars: [...c.querySelectorAll(".util .bar em")].map((e) => e.textContent),
        badge: (c.querySelector(".badge") || {}).textContent || null,
        canvas: c.querySelector("canvas").width,
      }));
      await page.screenshot({ path: `${outDir}/ui-training-${name}.png`, fullPage: true });
    }
    result[name] = { layers, reload, answer, stats, distinct_partial_lengths: distinct, failed, overflow, training, chatPage };
    await page.close();
  }
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
