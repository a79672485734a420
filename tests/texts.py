"""Multilingual test sentences in several scripts (Latin, Cyrillic, Greek, Arabic, Devanagari, Han, Thai)."""

SENTENCES = [
    "He deposited the check at the bank.",
    "The river bank was flooded after the storm, and nobody could cross it for days.",
    "Er hat den Scheck bei der Bank eingereicht.",
    "Il a déposé le chèque à la banque hier après-midi.",
    "Él depositó el cheque en el banco.",
    "Он положил чек в банк.",
    "Κατέθεσε την επιταγή στην τράπεζα.",
    "أودع الشيك في البنك.",
    "उसने बैंक में चेक जमा किया।",
    "他把支票存进了银行。",
    "เขาฝากเช็คที่ธนาคาร",
    "Banka çeki yatırdı ve eve döndü.",
    "Ngân hàng đóng cửa lúc năm giờ chiều.",
    "Benki ilifungwa mapema leo.",
    "A",
    "",
]

# Text the tiny tokenizers are trained on: the sentences plus some filler so merges exist.
TRAINING_CORPUS = SENTENCES * 3 + [
    "the quick brown fox jumps over the lazy dog",
    "der schnelle braune Fuchs springt über den faulen Hund",
    "le renard brun rapide saute par-dessus le chien paresseux",
    "быстрая коричневая лиса прыгает через ленивую собаку",
    "敏捷的棕色狐狸跳过了懒狗",
]
