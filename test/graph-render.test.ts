/**
 * The diagrams `workflowDiagram` writes, rendered for real: Mermaid itself in headless Chromium parses and
 * draws each one to SVG, and the test reads back every node's text and classes. It needs Chromium
 * (`/usr/bin/chromium`, or CHROMIUM) and a Mermaid browser bundle (`mermaid/dist/mermaid.min.js` when the
 * mermaid package is installed, or MERMAID_JS naming one); without them it skips and says which is missing.
 * graph-diagram.test.ts checks the same text with a strict parser of Mermaid's flowchart grammar always.
 */
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { Annotation, START, StateGraph } from "@langchain/langgraph";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { openStore, run, threadSteps, workflowDiagram } from "../src/index.ts";
import novel from "../graphs/novel.ts";
import shapes from "./fixtures/shapes-graph.ts";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

function mermaidBundle(): string | undefined {
  if (process.env.MERMAID_JS) return existsSync(process.env.MERMAID_JS) ? process.env.MERMAID_JS : undefined;
  try {
    return createRequire(import.meta.url).resolve("mermaid/dist/mermaid.min.js");
  } catch {
    return undefined;
  }
}

const MERMAID = mermaidBundle();
const THREAD = 'items style:#1; direction LR "q"';
const missing = !existsSync(CHROMIUM)
  ? `no Chromium at ${CHROMIUM} (install Debian's chromium or set CHROMIUM)`
  : !MERMAID
    ? "no Mermaid bundle (the mermaid package is not installed and MERMAID_JS names no mermaid.min.js)"
    : undefined;
if (missing) console.warn(`Skipping the Mermaid rendering test: ${missing}.`);

interface Rendered {
  ok: boolean;
  error?: string;
  /** Each drawn node: its text and its classes. */
  nodes: { text: string; classes: string[] }[];
  edgeLabels: string[];
  clusters: string[];
}

/** Render each diagram with Mermaid in headless Chromium. */
async function render(dir: string, diagrams: string[]): Promise<Rendered[]> {
  const page = join(dir, "page.html");
  await writeFile(join(dir, "diagrams.js"), `const DIAGRAMS = ${JSON.stringify(diagrams)};`);
  await writeFile(
    page,
    `<!doctype html><html><head><meta charset="utf-8"></head><body><pre id="out">pending</pre>
<script charset="utf-8" src="${pathToFileURL(MERMAID!).href}"></script>
<script charset="utf-8" src="diagrams.js"></script>
<script>
mermaid.initialize({ startOnLoad: false, securityLevel: "strict" });
(async () => {
  const results = [];
  for (const [i, text] of DIAGRAMS.entries()) {
    try {
      const { svg } = await mermaid.render("d" + i, text);
      // Into the page, not through an XML parser: labels are HTML (with <br>) inside the SVG.
      const doc = document.createElement("div");
      doc.innerHTML = svg;
      document.body.append(doc);
      results.push({
        ok: true,
        nodes: [...doc.querySelectorAll("g.node")].map((n) => ({ text: n.textContent.trim(), classes: [...n.classList] })),
        edgeLabels: [...doc.querySelectorAll("g.edgeLabel")].map((n) => n.textContent.trim()).filter(Boolean),
        clusters: [...doc.querySelectorAll("g.cluster")].map((n) => n.textContent.trim()),
      });
    } catch (e) {
      results.push({ ok: false, error: String((e && e.message) || e), nodes: [], edgeLabels: [], clusters: [] });
    }
  }
  // Base64, so the dump of the page carries the JSON without HTML escaping.
  document.getElementById("out").textContent = btoa(unescape(encodeURIComponent(JSON.stringify(results))));
})();
</script></body></html>`,
  );
  const args = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files", `--user-data-dir=${join(dir, "profile")}`, "--virtual-time-budget=30000", "--dump-dom", pathToFileURL(page).href];
  const dom = await new Promise<string>((resolve, reject) =>
    execFile(CHROMIUM, args, { timeout: 120_000, maxBuffer: 64 << 20 }, (error, stdout, stderr) => (error ? reject(new Error(`${error.message}\n${stderr}`)) : resolve(stdout))),
  );
  const out = /<pre id="out">([^<]*)<\/pre>/.exec(dom)?.[1];
  if (!out || out === "pending") throw new Error(`Mermaid did not finish rendering; page:\n${dom.slice(0, 2000)}`);
  return JSON.parse(Buffer.from(out, "base64").toString("utf8")) as Rendered[];
}

describe.skipIf(missing !== undefined)("Mermaid renders what workflowDiagram writes", () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "cairn-render-"));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("draws every node, edge label and legend, with the status classes, names and codes as written", async () => {
    const store = await openStore(`file:${join(dir, "store")}`);
    let marked: string;
    try {
      // A thread id may hold what Mermaid reads as syntax even inside quotes: it is the legend's title.
      await run(shapes, { thread: THREAD, input: { illustrations: 5, failItem: 3 }, store }).catch(() => {});
      marked = workflowDiagram(shapes, await threadSteps(shapes, store.saver, THREAD, store.uri));
    } finally {
      await store.close();
    }
    const State = Annotation.Root({ n: Annotation<number> });
    const odd = new StateGraph(State)
      .addNode('say "hi" <now> #1 direction LR', async () => ({ n: 1 }))
      .addNode("style #x;", async () => ({ n: 2 }))
      .addEdge(START, 'say "hi" <now> #1 direction LR')
      .addEdge('say "hi" <now> #1 direction LR', "style #x;");
    const [plain, withThread, book, strange] = await render(dir, [workflowDiagram(shapes), marked, workflowDiagram(novel), workflowDiagram(odd)]);

    expect(plain, plain!.error).toMatchObject({ ok: true });
    expect(plain!.nodes.map((n) => n.text)).toEqual(
      expect.arrayContaining(["start", "plan", "draft-chapter", "illustrate× items → pictures", "review(when)", "polish", "publish", "end", "?"]),
    );
    expect(plain!.nodes.find((n) => n.text.startsWith("route after publish"))!.text).toBe('route after publish: targets unknown. Declare them: .route("publish", fn, { targets: [ … ] })');
    expect(plain!.edgeLabels).toEqual(expect.arrayContaining(["loop", "skip review", "route"]));

    expect(withThread, withThread!.error).toMatchObject({ ok: true });
    const classOf = (text: string) => withThread!.nodes.find((n) => n.text === text)?.classes;
    expect(classOf("plan")).toContain("done");
    expect(classOf("illustrate× items → pictures4/5 items")).toContain("failed");
    expect(classOf("review(when)")).toContain("pending");
    expect(classOf("skipped")).toContain("skipped");
    expect(withThread!.clusters).toEqual([expect.stringContaining(`thread ${THREAD} · failed`)]);

    expect(book, book!.error).toMatchObject({ ok: true });
    expect(book!.nodes).toHaveLength(12);

    expect(strange, strange!.error).toMatchObject({ ok: true });
    expect(strange!.nodes.map((n) => n.text)).toEqual(expect.arrayContaining(['say "hi" <now> #1 direction LR', "style #x;"]));
  }, 180_000);
});
