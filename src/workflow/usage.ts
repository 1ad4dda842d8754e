import { BaseCallbackHandler } from "@langchain/core/callbacks/base";
import type { Serialized } from "@langchain/core/load/serializable";
import type { LLMResult } from "@langchain/core/outputs";
import { CairnError } from "../errors.ts";

/** Money and tokens spent by model calls. */
export interface Usage {
  usd: number;
  inputTokens: number;
  outputTokens: number;
  /** Model calls counted. */
  calls: number;
}

export const NO_USAGE: Usage = Object.freeze({ usd: 0, inputTokens: 0, outputTokens: 0, calls: 0 });

export function addUsage(a: Usage | undefined, b: Usage | undefined): Usage {
  return {
    usd: (a?.usd ?? 0) + (b?.usd ?? 0),
    inputTokens: (a?.inputTokens ?? 0) + (b?.inputTokens ?? 0),
    outputTokens: (a?.outputTokens ?? 0) + (b?.outputTokens ?? 0),
    calls: (a?.calls ?? 0) + (b?.calls ?? 0),
  };
}

export function subtractUsage(a: Usage | undefined, b: Usage | undefined): Usage {
  return {
    usd: (a?.usd ?? 0) - (b?.usd ?? 0),
    inputTokens: (a?.inputTokens ?? 0) - (b?.inputTokens ?? 0),
    outputTokens: (a?.outputTokens ?? 0) - (b?.outputTokens ?? 0),
    calls: (a?.calls ?? 0) - (b?.calls ?? 0),
  };
}

export function isEmptyUsage(u: Usage | undefined): boolean {
  return !u || (u.usd === 0 && u.inputTokens === 0 && u.outputTokens === 0 && u.calls === 0);
}

/** Dollars for people: cents for amounts of a dollar or more, four decimals below. */
export function formatUsd(usd: number): string {
  return usd >= 1 ? `$${usd.toFixed(2)}` : `$${usd.toFixed(4)}`;
}

/** Prices per million tokens, by model name. */
export type Pricing = Record<string, { inputPerMillion: number; outputPerMillion: number }>;

/**
 * The price entry for a model: an exact name, else the longest entry the name starts with
 * (`gpt-4o-mini` matches `gpt-4o-mini-2024-07-18`).
 */
export function priceOf(pricing: Pricing | undefined, model: string | undefined): Pricing[string] | undefined {
  if (!pricing || !model) return undefined;
  if (pricing[model]) return pricing[model];
  let best: string | undefined;
  for (const name of Object.keys(pricing)) if (model.startsWith(name) && (!best || name.length > best.length)) best = name;
  return best ? pricing[best] : undefined;
}

/** What a step reports through `ctx.usage`. */
export interface UsageReport {
  usd?: number;
  inputTokens?: number;
  outputTokens?: number;
  /** With no `usd`, the cost is computed from the run's pricing for this model. */
  model?: string;
  /** Model calls this report covers (default 1). */
  calls?: number;
}

/** Turn a report into a Usage, pricing tokens when no amount is given. Refuses nonsense before it is saved. */
export function usageFrom(report: UsageReport, pricing: Pricing | undefined, where: string): Usage {
  for (const key of ["usd", "inputTokens", "outputTokens", "calls"] as const) {
    const v = report[key];
    if (v !== undefined && (typeof v !== "number" || !Number.isFinite(v) || v < 0)) {
      throw new CairnError("INVALID_ARGUMENT", `${where} reported ${key} = ${String(v)}; usage amounts are finite numbers ≥ 0.`, {});
    }
  }
  const inputTokens = report.inputTokens ?? 0;
  const outputTokens = report.outputTokens ?? 0;
  let usd = report.usd;
  if (usd === undefined) {
    const price = priceOf(pricing, report.model);
    usd = price ? (inputTokens * price.inputPerMillion + outputTokens * price.outputPerMillion) / 1e6 : 0;
  }
  return { usd, inputTokens, outputTokens, calls: report.calls ?? 1 };
}

/**
 * Counts the tokens of every chat model call made inside a run, whichever way the step calls the model:
 * LangChain hands child runs the node's callbacks, and LangGraph tags each with the task it runs in
 * (`langgraph_checkpoint_ns` = `node:<task id>`). Awaited inline, so a task's usage is complete when its
 * function returns.
 */
export class UsageCallbackHandler extends BaseCallbackHandler {
  name = "cairn-usage";
  private readonly runs = new Map<string, { task: string | undefined; model: string | undefined }>();

  constructor(private readonly record: (task: string | undefined, usage: Usage) => void, private readonly pricing: () => Pricing | undefined) {
    super({ _awaitHandler: true });
  }

  handleChatModelStart(llm: Serialized, _messages: unknown, runId: string, _parent?: string, extra?: Record<string, unknown>, _tags?: string[], metadata?: Record<string, unknown>): void {
    this.started(llm, runId, extra, metadata);
  }

  handleLLMStart(llm: Serialized, _prompts: string[], runId: string, _parent?: string, extra?: Record<string, unknown>, _tags?: string[], metadata?: Record<string, unknown>): void {
    this.started(llm, runId, extra, metadata);
  }

  handleLLMEnd(output: LLMResult, runId: string): void {
    const run = this.runs.get(runId);
    this.runs.delete(runId);
    let inputTokens = 0;
    let outputTokens = 0;
    let found = false;
    for (const gen of output.generations.flat()) {
      const usage = (gen as { message?: { usage_metadata?: { input_tokens?: number; output_tokens?: number } } }).message?.usage_metadata;
      if (usage) {
        found = true;
        inputTokens += usage.input_tokens ?? 0;
        outputTokens += usage.output_tokens ?? 0;
      }
    }
    if (!found) {
      const legacy = (output.llmOutput?.tokenUsage ?? output.llmOutput?.estimatedTokenUsage) as { promptTokens?: number; completionTokens?: number } | undefined;
      inputTokens = legacy?.promptTokens ?? 0;
      outputTokens = legacy?.completionTokens ?? 0;
    }
    this.record(run?.task, usageFrom({ inputTokens, outputTokens, model: run?.model }, this.pricing(), "A model call"));
  }

  handleLLMError(_error: unknown, runId: string): void {
    this.runs.delete(runId);
  }

  private started(llm: Serialized, runId: string, extra?: Record<string, unknown>, metadata?: Record<string, unknown>): void {
    const ns = String(metadata?.langgraph_checkpoint_ns ?? "");
    // Nested graphs append `|child:<id>`; the top-level task is the unit cairn saves.
    const task = ns.split("|")[0]?.split(":")[1];
    const params = extra?.invocation_params as { model?: unknown; model_name?: unknown } | undefined;
    const model = metadata?.ls_model_name ?? params?.model ?? params?.model_name ?? llm.id?.[llm.id.length - 1];
    this.runs.set(runId, { task: task || undefined, model: typeof model === "string" ? model : undefined });
  }
}
