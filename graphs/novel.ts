/**
 * A novel written by a ten-step pipeline: interpret the brief, build the world, create the characters,
 * outline the plot, plan the chapters, write the chapters one at a time (one step run in a loop, so each
 * chapter is its own checkpoint), edit them (a fan-out, a few at a time), check continuity, write the
 * blurb, and assemble the book as a Markdown file at `<outDir>/<thread>/<slug>.md`.
 *
 * Every step calls the chat model, so cairn counts each step's tokens and prices them with
 * EXAMPLE_PRICING; `--budget-usd` stops the run at a step boundary once the thread has spent that much.
 * Runs offline with a deterministic stand-in model (set OPENAI_API_KEY and install @langchain/openai to
 * use a hosted one):
 *   cairn run graphs/novel.ts --thread book-001 --budget-usd 0.05     (stops after chapter 3)
 *   cairn resume graphs/novel.ts --thread book-001 --budget-usd 1
 *   cairn resume graphs/novel.ts --thread book-001 --from-step edit_chapters
 *
 * When NOVEL_EXEC_LOG names a file, every model call appends its key to it before it starts: the step, or
 * `<step>#<n>` for the nth character, chapter written or chapter edited. Tests count what ran again after
 * a stop or a crash.
 */
import { appendFileSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import { dirname, join } from "node:path";
import { HumanMessage, SystemMessage } from "@langchain/core/messages";
import writeFileAtomic from "write-file-atomic";
import { z } from "zod";
import { appendList, workflow, type StepContext } from "cairn";
import { chatModel, EXAMPLE_PRICING } from "./lib/model.ts";
import { hashText, seededRandom } from "./lib/random.ts";

const Chapter = z.object({ number: z.number().int(), title: z.string(), text: z.string(), words: z.number().int() });

const State = z.object({
  premise: z.string().min(1),
  genre: z.string().min(1),
  audience: z.string().min(1),
  title: z.string().min(1),
  chapterCount: z.number().int().min(1).max(60).default(6),
  /** Roughly how long each chapter is. */
  wordsPerChapter: z.number().int().min(50).max(10_000).default(600),
  characterCount: z.number().int().min(1).max(8).default(4),
  /** Milliseconds each stand-in model call takes. */
  delayMs: z.number().int().min(0).default(80),
  seed: z.number().int().default(11),
  /** The book is written to `<outDir>/<thread>/<slug>.md`, relative to the working directory. */
  outDir: z.string().min(1).default("out/novel"),

  interpretation: z.object({ logline: z.string(), notes: z.string() }).optional(),
  world: z.string().optional(),
  characters: z.array(z.object({ name: z.string(), role: z.string(), sketch: z.string() })).default([]),
  outline: z.string().optional(),
  plan: z.array(z.object({ number: z.number().int(), title: z.string(), summary: z.string() })).default([]),
  /** One chapter appended per run of write_chapter. */
  chapters: appendList(Chapter),
  edited: z.array(Chapter).default([]),
  continuity: z.object({ notes: z.string(), absentCharacters: z.array(z.string()) }).optional(),
  blurb: z.string().optional(),
  book: z.object({ path: z.string(), chapters: z.number().int(), words: z.number().int(), bytes: z.number().int() }).optional(),
});
type State = z.infer<typeof State>;

/** What a model call needs from the state; fan-out items carry it, since they do not see the state. */
type ModelSettings = Pick<State, "seed" | "delayMs">;

const ROLES = ["protagonist", "antagonist", "mentor", "confidant", "rival", "stranger", "child", "elder"];
const NAMES = ["Maren", "Tobias", "Ilse", "Corin", "Agnes", "Edvin", "Sunniva", "Haldor", "Liv", "Oskar", "Brita", "Jonas"];

/** One model call. `key` names it in NOVEL_EXEC_LOG; the line is written synchronously before the call. */
async function ask(settings: ModelSettings, ctx: StepContext, key: string, system: string, prompt: string): Promise<string> {
  const log = process.env.NOVEL_EXEC_LOG;
  if (log) appendFileSync(log, `${key}\n`);
  const model = await chatModel({ seed: settings.seed, delayMs: settings.delayMs });
  const reply = await model.invoke([new SystemMessage(system), new HumanMessage(prompt)], { signal: ctx.signal });
  return typeof reply.content === "string" ? reply.content : JSON.stringify(reply.content);
}

function sentencesOf(text: string): string[] {
  return (text.match(/[^.!?]+[.!?]+/g) ?? [text]).map((s) => s.trim()).filter(Boolean);
}

const wordCount = (text: string) => text.split(/\s+/).filter(Boolean).length;

/** The stand-in writes sentences of about ten words; a hosted model ignores the hint and reads the words. */
const sentencesFor = (words: number) => Math.max(3, Math.round(words / 10));

function titleCase(words: string[]): string {
  return words.map((w) => w.charAt(0).toUpperCase() + w.slice(1).toLowerCase()).join(" ");
}

function slugOf(title: string): string {
  return title.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "") || "book";
}

/** Paragraphs of four to six sentences, the split fixed by the text itself. */
function paragraphs(text: string): string[] {
  const sentences = sentencesOf(text);
  const next = seededRandom(hashText(text));
  const out: string[] = [];
  for (let i = 0; i < sentences.length; ) {
    const n = 4 + Math.floor(next() * 3);
    out.push(sentences.slice(i, i + n).join(" "));
    i += n;
  }
  return out;
}

function shuffled<T>(items: readonly T[], next: () => number): T[] {
  const out = [...items];
  for (let i = out.length - 1; i > 0; i -= 1) {
    const j = Math.floor(next() * (i + 1));
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
}

/** A thread id as one safe folder name (ids may hold "/" or ".."): as the file store names thread folders. */
function folderOf(thread: string): string {
  return thread.replace(/[^A-Za-z0-9_-]/gu, (c) => [...Buffer.from(c)].map((b) => `%${b.toString(16).toUpperCase().padStart(2, "0")}`).join(""));
}

const cast = (s: State) => s.characters.map((c) => `${c.name} (${c.role})`).join(", ");

const AUTHOR = "You write fiction in plain prose.";

export default workflow("novel", {
  state: State,
  defaultInput: {
    premise: "a lighthouse keeper's last winter on a northern island, before the light is automated",
    genre: "literary fiction",
    audience: "adult readers",
    title: "The Last Winter at Skerry Light",
  },
  version: "1",
  pricing: EXAMPLE_PRICING,
})
  .step("interpret_brief", async (s, ctx) => {
    const reply = await ask(s, ctx, ctx.step, "You turn a publisher's brief into a working logline and notes.",
      `Brief: ${s.premise}. Genre: ${s.genre}. Audience: ${s.audience}. Title: ${s.title}. Give a one-sentence logline, then notes on tone and themes. [sentences:4]`);
    const [logline = reply, ...notes] = sentencesOf(reply);
    return { interpretation: { logline, notes: notes.join(" ") } };
  })
  .step("build_world", async (s, ctx) => {
    const world = await ask(s, ctx, ctx.step, AUTHOR,
      `Describe the world of "${s.title}": places, season, customs, what daily life costs. Logline: ${s.interpretation!.logline} Notes: ${s.interpretation!.notes} [sentences:6]`);
    return { world };
  })
  .step("create_characters", async (s, ctx) => {
    const names = shuffled(NAMES, seededRandom(s.seed ^ hashText(s.premise))).slice(0, s.characterCount);
    const characters = [];
    for (const [i, name] of names.entries()) {
      const role = ROLES[i % ROLES.length]!;
      const sketch = await ask(s, ctx, `${ctx.step}#${i + 1}`, AUTHOR,
        `Sketch ${name}, the ${role} of "${s.title}": history, want, fear, how they speak. World: ${s.world} [sentences:3]`);
      characters.push({ name, role, sketch });
    }
    ctx.log(`cast: ${characters.map((c) => `${c.name} (${c.role})`).join(", ")}`);
    return { characters };
  })
  .step("outline_plot", async (s, ctx) => {
    const outline = await ask(s, ctx, ctx.step, "You outline novels in three acts.",
      `Outline "${s.title}" (${s.genre}) in three acts. Logline: ${s.interpretation!.logline} Characters: ${cast(s)}. [sentences:${s.chapterCount * 2}]`);
    return { outline };
  })
  .step("plan_chapters", async (s, ctx) => {
    const reply = await ask(s, ctx, ctx.step, "You plan chapters: one sentence per chapter, in order.",
      `Plan ${s.chapterCount} chapters for "${s.title}" from this outline: ${s.outline} [sentences:${s.chapterCount}]`);
    // A model may give fewer sentences than asked; the outline fills the gap so every chapter has a plan.
    const sentences = [...sentencesOf(reply), ...sentencesOf(s.outline!)];
    const plan = Array.from({ length: s.chapterCount }, (_, i) => {
      const summary = sentences[i % sentences.length]!;
      return { number: i + 1, title: titleCase(summary.replace(/[.!?]+$/, "").split(/\s+/).slice(0, 4)), summary };
    });
    return { plan };
  })
  .step("write_chapter", async (s, ctx) => {
    const entry = s.plan[s.chapters.length]!;
    const previous = s.chapters.at(-1);
    const recap = previous ? ` The previous chapter ended: ${sentencesOf(previous.text).slice(-2).join(" ")}` : "";
    ctx.progress(entry.number - 1, s.plan.length, entry.title);
    const text = await ask(s, ctx, `${ctx.step}#${entry.number}`, AUTHOR,
      `Write chapter ${entry.number} of ${s.plan.length} of "${s.title}", a ${s.genre} novel for ${s.audience}, about ${s.wordsPerChapter} words. ` +
        `Characters: ${cast(s)}. This chapter: ${entry.summary}${recap} [sentences:${sentencesFor(s.wordsPerChapter)}]`);
    const words = wordCount(text);
    ctx.log(`chapter ${entry.number}/${s.plan.length} "${entry.title}": ${words} words`);
    return { chapters: [{ number: entry.number, title: entry.title, text, words }] };
  })
  .map("edit_chapters", {
    over: (s) => s.chapters.map((chapter) => ({ chapter, settings: { seed: s.seed, delayMs: s.delayMs }, genre: s.genre })),
    run: async ({ chapter, settings, genre }, ctx) => {
      const text = await ask(settings, ctx, `${ctx.step}#${chapter.number}`, "You are a line editor. Keep the story; tighten the prose.",
        `Edit chapter ${chapter.number} ("${chapter.title}") of a ${genre} novel. Keep its length. ${chapter.text} [sentences:${sentencesOf(chapter.text).length}]`);
      return { ...chapter, text, words: wordCount(text) };
    },
    into: "edited",
    // Three chapters at a time: editing is the widest burst of calls, and model APIs rate-limit.
    concurrency: 3,
  })
  .step("continuity_check", async (s, ctx) => {
    const book = s.edited.map((c) => c.text).join("\n");
    const absentCharacters = s.characters.filter((c) => !book.toLowerCase().includes(c.name.toLowerCase())).map((c) => c.name);
    const notes = await ask(s, ctx, ctx.step, "You check manuscripts for continuity errors.",
      `Characters: ${cast(s)}. Chapter openings: ${s.edited.map((c) => `${c.number}. ${sentencesOf(c.text)[0]}`).join(" ")} List continuity problems. [sentences:3]`);
    ctx.log(absentCharacters.length ? `never named in the text: ${absentCharacters.join(", ")}` : "every character appears in the text");
    return { continuity: { notes, absentCharacters } };
  })
  .step("write_blurb", async (s, ctx) => {
    const blurb = await ask(s, ctx, ctx.step, "You write back-cover copy.",
      `Write the back-cover blurb of "${s.title}" for ${s.audience}. Logline: ${s.interpretation!.logline} Characters: ${cast(s)}. [sentences:4]`);
    return { blurb };
  })
  .step("assemble_book", async (s, ctx) => {
    const epigraph = await ask(s, ctx, ctx.step, "You choose epigraphs.", `One line to open "${s.title}", in the spirit of: ${s.interpretation!.logline} [sentences:1]`);
    const markdown = [
      `# ${s.title}`,
      `*${s.genre} · for ${s.audience}*`,
      `> ${epigraph}`,
      s.blurb!,
      "## Contents",
      s.edited.map((c) => `${c.number}. ${c.title}`).join("\n"),
      ...s.edited.flatMap((c) => [`## Chapter ${c.number}: ${c.title}`, ...paragraphs(c.text)]),
    ].join("\n\n") + "\n";
    // The thread in the path keeps two runs of one brief apart; the text itself depends only on the input.
    const path = join(s.outDir, folderOf(ctx.thread), `${slugOf(s.title)}.md`);
    await mkdir(dirname(path), { recursive: true });
    await writeFileAtomic(path, markdown);
    const words = s.edited.reduce((n, c) => n + c.words, 0);
    ctx.log(`wrote ${path}: ${s.edited.length} chapters, ${words} words`);
    return { book: { path, chapters: s.edited.length, words, bytes: Buffer.byteLength(markdown) } };
  })
  .route("write_chapter", (s) => (s.chapters.length < s.plan.length ? "write_chapter" : "edit_chapters"), { targets: ["write_chapter", "edit_chapters"] });
