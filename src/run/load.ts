import { stat } from "node:fs/promises";
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { CairnError } from "../errors.ts";
import { isWorkflow } from "../workflow/builder.ts";
import { asStateGraph, describeValue, type RunTarget } from "./prepare.ts";

/**
 * Load a graph module (TypeScript or JavaScript) and return what it exports by default: a cairn
 * workflow or a LangGraph `StateGraph` (compiled graphs are accepted; their builder is used).
 * TypeScript files need the tsx loader, which the `cairn` binary registers.
 */
export async function loadGraph(file: string, cwd = process.cwd()): Promise<RunTarget> {
  const path = resolve(cwd, file);
  try {
    const s = await stat(path);
    if (!s.isFile()) throw new Error("not a file");
  } catch {
    throw new CairnError(
      "GRAPH_LOAD_FAILED",
      `Graph file "${file}" does not exist (looked for ${path}). Pass the path of a module whose default export is a cairn workflow or a LangGraph StateGraph.`,
      { file },
    );
  }
  let mod: Record<string, unknown>;
  try {
    mod = (await import(pathToFileURL(path).href)) as Record<string, unknown>;
  } catch (cause) {
    const message = cause instanceof Error ? cause.message.split("\n")[0] : String(cause);
    throw new CairnError("GRAPH_LOAD_FAILED", `Could not load graph file "${file}": ${message}`, { file }, { cause });
  }
  const exported = mod.default ?? mod.graph ?? mod.workflow;
  if (isWorkflow(exported)) return exported;
  try {
    return asStateGraph(exported);
  } catch {
    throw new CairnError(
      "GRAPH_LOAD_FAILED",
      `"${file}" exports no graph: its default export is ${describeValue(exported)}. Export default a cairn workflow (\`export default workflow(...)\`) or a LangGraph StateGraph.`,
      { file },
    );
  }
}
