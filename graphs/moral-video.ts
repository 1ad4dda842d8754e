/**
 * A moral-story video pipeline in six steps: analyse the brief, research it, write the story, cut it into
 * scenes, design each scene (a fan-out, one model call per scene), assemble the video timeline.
 *
 * Runs offline with a deterministic stand-in model (set OPENAI_API_KEY and install @langchain/openai to
 * use a hosted one). `failOnceAt` makes a named step fail on its first attempt, to try resume:
 *   cairn run graphs/moral-video.ts --input '{"failOnceAt":"story_generator"}' --thread demo
 *   cairn resume graphs/moral-video.ts --thread demo
 */
import { HumanMessage, SystemMessage } from "@langchain/core/messages";
import { z } from "zod";
import { workflow, type StepContext } from "cairn";
import { chatModel, EXAMPLE_PRICING, modelName } from "./lib/model.ts";

const Scene = z.object({
  index: z.number(),
  narration: z.string(),
  character: z.string(),
  imagePrompt: z.string(),
  seconds: z.number(),
});

const State = z.object({
  topic: z.string().min(1),
  moral: z.string().min(1),
  audience: z.string().default("children aged 6-9"),
  sceneCount: z.number().int().min(1).max(50).default(6),
  /** Milliseconds each stand-in model call takes. */
  delayMs: z.number().int().min(0).default(120),
  seed: z.number().int().default(7),
  /** A step name: that step fails on its first attempt (a scene of character_designer, for that step). */
  failOnceAt: z.string().optional(),

  context: z.object({ summary: z.string(), queries: z.array(z.string()) }).optional(),
  research: z.array(z.object({ query: z.string(), notes: z.string() })).optional(),
  story: z.object({ title: z.string(), text: z.string() }).optional(),
  segments: z.array(z.object({ index: z.number(), narration: z.string() })).default([]),
  scenes: z.array(Scene).default([]),
  video: z
    .object({ title: z.string(), seconds: z.number(), timeline: z.array(z.object({ at: z.number(), scene: z.number(), caption: z.string() })) })
    .optional(),
});
type State = z.infer<typeof State>;

async function ask(state: State, ctx: StepContext, system: string, prompt: string): Promise<string> {
  const model = await chatModel({ seed: state.seed, delayMs: state.delayMs });
  const reply = await model.invoke([new SystemMessage(system), new HumanMessage(prompt)], { signal: ctx.signal });
  return typeof reply.content === "string" ? reply.content : JSON.stringify(reply.content);
}

function maybeFail(state: State, ctx: StepContext, detail = ""): void {
  if (state.failOnceAt === ctx.step && ctx.attempt === 1) {
    throw new Error(`simulated rate limit (429) in ${ctx.step}${detail} — failOnceAt is set; it succeeds on the next attempt`);
  }
}

/** The story writer's instructions. */
const STORY_SYSTEM = "You write short moral stories.";

export default workflow("moral-video", {
  state: State,
  defaultInput: { topic: "a lost wallet found on the way to school", moral: "honesty is worth more than what it costs" },
  version: "1",
  pricing: EXAMPLE_PRICING,
})
  .step("context_analyzer", async (s, ctx) => {
    maybeFail(s, ctx);
    const summary = await ask(s, ctx, "You analyse briefs for short moral videos.", `Brief: ${s.topic}. Moral: ${s.moral}. Audience: ${s.audience}. [sentences:2]`);
    return { context: { summary, queries: [`${s.topic} story ideas`, `teaching ${s.moral} to ${s.audience}`] } };
  })
  .step("web_researcher", async (s, ctx) => {
    maybeFail(s, ctx);
    const research = [];
    for (const query of s.context!.queries) {
      ctx.log(`researching "${query}"`);
      research.push({ query, notes: await ask(s, ctx, "You summarise research notes.", `Query: ${query} [sentences:2]`) });
    }
    return { research };
  })
  .step(
    "story_generator",
    async (s, ctx) => {
      maybeFail(s, ctx);
      const notes = s.research!.map((r) => r.notes).join(" ");
      const text = await ask(s, ctx, STORY_SYSTEM, `Write a story about ${s.topic} teaching that ${s.moral}. Notes: ${notes} [sentences:${s.sceneCount * 2}]`);
      return { story: { title: `The ${s.topic.split(" ").slice(0, 3).join(" ")}`, text } };
    },
    // What the story depends on besides the state: edit the prompt or switch models, and a resume of a
    // thread that already wrote its story says the story is stale instead of quietly keeping it.
    { fingerprint: { system: STORY_SYSTEM, model: modelName() } },
  )
  .step("script_segmenter", async (s, ctx) => {
    maybeFail(s, ctx);
    const sentences = s.story!.text.match(/[^.]+\./g) ?? [s.story!.text];
    const per = Math.max(1, Math.ceil(sentences.length / s.sceneCount));
    const segments = Array.from({ length: s.sceneCount }, (_, index) => ({
      index,
      narration: sentences.slice(index * per, (index + 1) * per).join(" ").trim() || sentences[sentences.length - 1]!.trim(),
    }));
    return { segments };
  })
  .map("character_designer", {
    over: (s) => s.segments.map((segment) => ({ segment, state: { seed: s.seed, delayMs: s.delayMs, failOnceAt: s.failOnceAt, audience: s.audience } })),
    run: async ({ segment, state }, ctx) => {
      if (state.failOnceAt === ctx.step && ctx.index === 2 && ctx.attempt === 1) {
        throw new Error(`simulated timeout designing scene ${ctx.index} — failOnceAt is set; it succeeds on the next attempt`);
      }
      const character = await ask(state as State, ctx, "You design characters for illustrated scenes.", `Scene: ${segment.narration} [sentences:1]`);
      return {
        index: segment.index,
        narration: segment.narration,
        character,
        imagePrompt: `storybook illustration for ${state.audience}: ${character}`,
        seconds: 4 + Math.ceil(segment.narration.length / 40),
      };
    },
    into: "scenes",
  })
  .step("video_assembler", async (s, ctx) => {
    maybeFail(s, ctx);
    let at = 0;
    const timeline = s.scenes.map((scene) => {
      const entry = { at, scene: scene.index, caption: scene.narration.slice(0, 80) };
      at += scene.seconds;
      return entry;
    });
    ctx.log(`assembled ${timeline.length} scenes, ${at}s`);
    return { video: { title: s.story!.title, seconds: at, timeline } };
  });
