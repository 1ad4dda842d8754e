import { BaseChatModel, type BaseChatModelParams } from "@langchain/core/language_models/chat_models";
import { AIMessage, type BaseMessage } from "@langchain/core/messages";
import type { ChatResult } from "@langchain/core/outputs";
import { hashText, seededRandom } from "./random.ts";

/**
 * A deterministic stand-in for a chat model, so the example graphs run offline with no API key. It is a
 * real @langchain/core chat model: steps call it exactly as they would call a hosted one. The same prompt
 * and seed always give the same text; each call waits `delayMs` (honouring the abort signal) and reports
 * token usage like a hosted model does.
 */
export class StandInChatModel extends BaseChatModel {
  private readonly seed: number;
  private readonly delayMs: number;

  constructor(fields: BaseChatModelParams & { seed?: number; delayMs?: number } = {}) {
    super(fields);
    this.seed = fields.seed ?? 7;
    this.delayMs = fields.delayMs ?? 100;
  }

  _llmType(): string {
    return "cairn-stand-in";
  }

  /** The model name cairn's usage counter sees (and prices with {@link STAND_IN_PRICING}). */
  getLsParams(options: this["ParsedCallOptions"]) {
    return { ...super.getLsParams(options), ls_model_name: STAND_IN_MODEL };
  }

  async _generate(messages: BaseMessage[], options: this["ParsedCallOptions"]): Promise<ChatResult> {
    const prompt = messages.map((m) => (typeof m.content === "string" ? m.content : JSON.stringify(m.content))).join("\n");
    await sleep(this.delayMs, options.signal);
    const rand = seededRandom(hashText(prompt) ^ this.seed);
    const sentences = Number(/\[sentences:(\d+)\]/.exec(prompt)?.[1] ?? 3);
    const topicWords = prompt
      .replace(/\[[^\]]*\]/g, " ")
      .split(/[^A-Za-z']+/)
      .filter((w) => w.length > 3)
      .slice(0, 40);
    const text = Array.from({ length: sentences }, () => sentence(rand, topicWords)).join(" ");
    const inputTokens = Math.ceil(prompt.length / 4);
    const outputTokens = Math.ceil(text.length / 4);
    const message = new AIMessage({
      content: text,
      usage_metadata: { input_tokens: inputTokens, output_tokens: outputTokens, total_tokens: inputTokens + outputTokens },
    });
    return { generations: [{ text, message }] };
  }
}

export const STAND_IN_MODEL = "stand-in";

/**
 * Prices per million tokens for the example graphs. The stand-in is priced like a mid-size hosted model
 * ($3 in, $15 out) so that cost, budgets and "what resuming saved" show real-looking numbers offline;
 * the hosted default is priced at its list price. Workflows pass this as their `pricing`.
 */
export const EXAMPLE_PRICING = {
  [STAND_IN_MODEL]: { inputPerMillion: 3, outputPerMillion: 15 },
  "gpt-4o-mini": { inputPerMillion: 0.15, outputPerMillion: 0.6 },
};

/** The name of the model `chatModel()` returns: what a step's fingerprint records. */
export function modelName(): string {
  return process.env.OPENAI_API_KEY ? (process.env.CAIRN_OPENAI_MODEL ?? "gpt-4o-mini") : STAND_IN_MODEL;
}

/** The chat model the examples use: a hosted one when configured, else the offline stand-in. */
export async function chatModel(options: { seed?: number; delayMs?: number } = {}): Promise<BaseChatModel> {
  if (process.env.OPENAI_API_KEY) {
    const pkg = "@langchain/openai";
    let mod: { ChatOpenAI: new (fields: { model: string }) => BaseChatModel };
    try {
      mod = await import(pkg);
    } catch {
      throw new Error("OPENAI_API_KEY is set but @langchain/openai is not installed. Run `npm install @langchain/openai`, or unset OPENAI_API_KEY to use the offline stand-in.");
    }
    return new mod.ChatOpenAI({ model: modelName() });
  }
  return new StandInChatModel(options);
}

const FILLER = ["the", "quiet", "village", "river", "promise", "lantern", "friend", "morning", "choice", "truth", "small", "brave", "path", "gift", "storm", "garden", "voice", "window"];

function sentence(rand: () => number, words: string[]): string {
  const pool = words.length ? [...words, ...FILLER] : FILLER;
  const n = 6 + Math.floor(rand() * 8);
  const out = Array.from({ length: n }, () => pool[Math.floor(rand() * pool.length)]!.toLowerCase());
  out[0] = out[0]!.charAt(0).toUpperCase() + out[0]!.slice(1);
  return `${out.join(" ")}.`;
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(new Error("aborted"));
    const onAbort = () => {
      clearTimeout(timer);
      reject(new Error("aborted"));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
