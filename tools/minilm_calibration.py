"""Calibration data for all-MiniLM-L6-v2: 72 real sentences, none of them among ``minilm.SENTENCES``.

``--method gptq`` needs the model's inputs on representative text; the accuracy is then measured on
``minilm.SENTENCES`` (24 other sentences), so calibration and evaluation never share a sentence
(``tests/test_methods_minilm.py`` checks it). ``python tools/minilm_calibration.py OUT.npz`` writes the tokenized
batch (``input_ids`` and ``attention_mask``, int64, padded to the longest) for ``onnx-nf4 quantize --calibration``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm

#: 72 sentences of varied topic, register and length, disjoint from ``minilm.SENTENCES``.
CALIBRATION_SENTENCES: tuple[str, ...] = (
    "The library closes early on Sundays during the summer months.",
    "Researchers found that sleep deprivation impairs short-term memory.",
    "Add two cups of flour and stir until the batter is smooth.",
    "The train to Edinburgh was delayed by forty minutes this morning.",
    "Our quarterly revenue grew by eight percent compared with last year.",
    "A flock of geese flew south over the frozen lake.",
    "The new smartphone has a larger battery and a brighter display.",
    "Children learn languages more easily than most adults do.",
    "The judge dismissed the case for lack of evidence.",
    "Mount Everest is the highest mountain above sea level.",
    "Can you recommend a good Italian restaurant near the station?",
    "The software update fixed a security vulnerability in the browser.",
    "Coral reefs are threatened by rising ocean temperatures.",
    "He practised the violin for three hours every afternoon.",
    "The committee will publish its final report next spring.",
    "Wind turbines generate electricity from the kinetic energy of moving air.",
    "I left my keys on the kitchen table before going out.",
    "The novel tells the story of a family across four generations.",
    "Vaccines train the immune system to recognise specific pathogens.",
    "The hotel offers free breakfast and a shuttle to the airport.",
    "Stock markets fell sharply after the unexpected announcement.",
    "The river flooded the village after days of torrential rain.",
    "Linear algebra is essential for understanding machine learning.",
    "She painted the fence white and planted roses along it.",
    "The ancient city was buried under volcanic ash for centuries.",
    "Turn left at the second traffic light and the bakery is on your right.",
    "The goalkeeper saved a penalty in the final minute of the game.",
    "Dolphins are known for their intelligence and playful behaviour.",
    "The database query took too long because the index was missing.",
    "My brother is moving to Canada to start a new job.",
    "Inflation reduces the purchasing power of savings over time.",
    "The lighthouse guided ships safely into the harbour at night.",
    "Students must submit their essays before the end of the week.",
    "The chef seasoned the soup with fresh thyme and black pepper.",
    "Astronomers detected a planet orbiting a distant red dwarf star.",
    "The meeting was rescheduled because the manager was ill.",
    "Bicycles are a cheap and healthy way to commute in the city.",
    "The printer keeps jamming whenever I use thick paper.",
    "Elephants can recognise themselves in a mirror.",
    "The government announced new funding for public transport.",
    "After the storm, the streets were covered with fallen branches.",
    "The app lets users track their spending and set monthly budgets.",
    "Medieval castles were built with thick stone walls and narrow windows.",
    "Is it going to be sunny enough for a picnic tomorrow?",
    "The pianist received a standing ovation after her performance.",
    "Antibiotics are ineffective against viral infections such as the flu.",
    "The children built a sandcastle and decorated it with shells.",
    "The engineers tested the bridge under extreme loads.",
    "A good night's sleep helps the body recover after exercise.",
    "The auction house sold the painting for a record price.",
    "Please send me the invoice by email at your earliest convenience.",
    "The desert temperature drops dramatically after sunset.",
    "Open-source projects rely on volunteers from around the world.",
    "The farmer harvested the wheat before the first autumn frost.",
    "The documentary explores the migration of monarch butterflies.",
    "Our flight was cancelled, so we spent the night at the airport.",
    "The encryption algorithm protects messages from eavesdroppers.",
    "The village celebrates its harvest festival every September.",
    "Too much sugar in the diet increases the risk of diabetes.",
    "The old clock in the hallway stopped at exactly midnight.",
    "The robot vacuum cleaner maps each room before it starts.",
    "Shakespeare wrote many of his plays for the Globe Theatre.",
    "Heavy traffic on the motorway made us late for the wedding.",
    "The telescope's mirror must be polished to a precision of nanometres.",
    "He apologised for the misunderstanding and offered to help.",
    "Glaciers carve deep valleys as they slowly move downhill.",
    "The marketing team launched a campaign aimed at young professionals.",
    "Fresh bread from the oven filled the kitchen with a wonderful smell.",
    "The vaccine trial enrolled thousands of volunteers on three continents.",
    "Why does the sky turn red and orange at sunset?",
    "The accountant found an error in last month's payroll.",
    "A sudden gust of wind blew the hat off his head.",
)


def write_calibration_npz(path: str | Path, texts: tuple[str, ...] = CALIBRATION_SENTENCES) -> Path:
    """Tokenize ``texts`` and write them as one calibration batch (``input_ids``, ``attention_mask``) to ``path``."""
    path = Path(path)
    np.savez(path, **minilm.encode(texts))
    return path


if __name__ == "__main__":
    out = write_calibration_npz(sys.argv[1] if len(sys.argv) > 1 else "minilm_calibration.npz")
    print(f"wrote {out}: {len(CALIBRATION_SENTENCES)} sentences")
