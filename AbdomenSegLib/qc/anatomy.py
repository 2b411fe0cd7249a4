"""Reference anatomy for the result check (qc/check.py): organ volume bands and where organs lie relative to each other.

Volumes (mL, adults). The bands are deliberately wider than the normal ranges of the studies cited, so that
a value outside them is atypical by any standard; they also contain every reference organ of the 24 BTCV and
16 CHAOS label maps here (CHAOS scans are of healthy liver donors) except btcv_img0009's 3.1 L spleen, which is
true splenomegaly:
- liver: Heinemann A, Wischhusen F, Püschel K, Rogiers X. Standard liver volume in the Caucasian population.
  Liver Transpl Surg 1999;5:366-368 (an autopsy series). BTCV references 1030-2503 mL, CHAOS
  1013-3432 mL.
- spleen: Prassopoulos P, Daskalogiannaki M, Raissaki M, Hatjidakis A, Gourtsoyiannis N. Determination of normal
  splenic volume on computed tomography in relation to age, gender and body habitus. Eur Radiol 1997;7:246-248
  (normal 107-314 mL). BTCV 63-416 mL (and 3077), CHAOS 131-742 mL: the band's top is set above CHAOS's
  largest healthy spleen, so only marked enlargement is noted.
- kidneys: Glodny B, Unterholzner V, Taferner B, et al. Normal kidney size and its influencing factors - a
  64-slice MDCT study of 1,040 asymptomatic patients. BMC Urol 2009;9:19. BTCV 79-261 mL, CHAOS 117-293 mL.
- pancreas: Syed AB, Mahal RS, Schumm LP, Dachman AH. Pancreas size and volume on computed tomography in normal
  adults. Pancreas 2012;41:589-595. BTCV 41-135 mL.
Gallbladder, stomach and bowel-adjacent structures vary with fasting and filling, vessels and the esophagus
with the field of view: no band.

Positions: OFFSETS_MM[organ][anchor] = (mean, standard deviation) of organ centroid minus anchor centroid, in mm
along patient axes LPS (+x left, +y posterior, +z superior), over the 24 BTCV reference label maps with their
true direction (diag(1,-1,1)). Used to say where a missing organ should have been.
"""

from __future__ import annotations

VOLUME_BANDS_ML = {
    "liver": (800.0, 3600.0),
    "spleen": (40.0, 800.0),
    "kidney_right": (60.0, 350.0),
    "kidney_left": (60.0, 350.0),
    "pancreas": (25.0, 160.0),
}

# Organs whose absence, where the image covers their place, makes a result suspect (a warning); the others
# are often legitimately absent (gallbladder after cholecystectomy) or too small to expect every time.
EXPECTED_WHEN_COVERED = (
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "pancreas",
    "stomach",
    "aorta",
    "inferior_vena_cava",
)
NOTED_WHEN_MISSING = ("gallbladder", "esophagus", "portal_splenic_vein")

ANCHORS = ("liver", "spleen", "kidney_right", "kidney_left")
OFFSETS_MM = {
    "adrenal_gland_left": {
        "liver": ((102, 32, -16), (16, 13, 23)),
        "spleen": ((-63, -22, -16), (10, 15, 9)),
        "kidney_right": ((104, -16, 52), (13, 14, 17)),
        "kidney_left": ((-36, -19, 45), (6, 12, 11)),
    },
    "adrenal_gland_right": {
        "liver": ((33, 42, -7), (13, 12, 18)),
        "spleen": ((-132, -12, -7), (20, 18, 15)),
        "kidney_right": ((35, -6, 62), (6, 15, 14)),
        "kidney_left": ((-105, -9, 54), (14, 18, 22)),
    },
    "aorta": {
        "liver": ((78, 29, 16), (12, 17, 29)),
        "spleen": ((-88, -25, 16), (13, 18, 38)),
        "kidney_right": ((80, -19, 85), (13, 19, 31)),
        "kidney_left": ((-60, -22, 77), (8, 16, 43)),
    },
    "esophagus": {
        "liver": ((74, 26, 64), (11, 13, 17)),
        "spleen": ((-91, -28, 64), (14, 15, 27)),
        "kidney_right": ((76, -23, 133), (14, 16, 23)),
        "kidney_left": ((-64, -26, 125), (10, 15, 33)),
    },
    "gallbladder": {
        "liver": ((-6, -28, -42), (15, 17, 14)),
        "spleen": ((-171, -83, -41), (31, 30, 32)),
        "kidney_right": ((-3, -76, 28), (20, 21, 25)),
        "kidney_left": ((-145, -79, 21), (26, 21, 34)),
    },
    "inferior_vena_cava": {
        "liver": ((46, 17, -20), (12, 10, 15)),
        "spleen": ((-120, -37, -20), (17, 16, 20)),
        "kidney_right": ((48, -31, 49), (8, 13, 17)),
        "kidney_left": ((-92, -34, 41), (12, 13, 26)),
    },
    "kidney_left": {
        "liver": ((138, 51, -61), (17, 17, 31)),
        "spleen": ((-27, -3, -61), (9, 15, 12)),
        "kidney_right": ((140, 3, 8), (17, 14, 22)),
    },
    "kidney_right": {
        "liver": ((-2, 48, -69), (16, 16, 20)),
        "spleen": ((-167, -6, -69), (22, 18, 19)),
        "kidney_left": ((-140, -3, -8), (17, 14, 22)),
    },
    "liver": {
        "spleen": ((-166, -54, 0), (23, 19, 25)),
        "kidney_right": ((2, -48, 69), (16, 16, 20)),
        "kidney_left": ((-138, -51, 61), (17, 17, 31)),
    },
    "pancreas": {
        "liver": ((81, -4, -37), (17, 13, 17)),
        "spleen": ((-84, -58, -37), (17, 16, 15)),
        "kidney_right": ((83, -52, 31), (15, 17, 16)),
        "kidney_left": ((-57, -55, 24), (14, 11, 17)),
    },
    "portal_splenic_vein": {
        "liver": ((58, -3, -14), (13, 9, 14)),
        "spleen": ((-108, -57, -14), (17, 17, 15)),
        "kidney_right": ((60, -52, 55), (14, 16, 16)),
        "kidney_left": ((-80, -55, 47), (13, 12, 18)),
    },
    "spleen": {
        "liver": ((166, 54, 0), (23, 19, 25)),
        "kidney_right": ((167, 6, 69), (22, 18, 19)),
        "kidney_left": ((27, 3, 61), (9, 15, 12)),
    },
    "stomach": {
        "liver": ((115, -20, -3), (17, 21, 13)),
        "spleen": ((-50, -74, -3), (20, 17, 26)),
        "kidney_right": ((117, -69, 65), (22, 17, 21)),
        "kidney_left": ((-23, -72, 58), (18, 16, 29)),
    },
}
