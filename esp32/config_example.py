# Settings of the ESP32 pulse reader. Copy this file to config.py, fill it in,
# and copy config.py to the device with main.py and pulse_logic.py:
#
#     cp esp32/config_example.py esp32/config.py
#     mpremote cp esp32/config.py :config.py
#
# config.py holds the Wi-Fi password and the receiver's token: it is
# git-ignored, never commit it. Anything left out takes the default shown.

# Wi-Fi (2.4 GHz only: the ESP32 has no 5 GHz radio).
WIFI_SSID = "my-network"
WIFI_PASSWORD = "change-me"

# The receiver (esp32_receiver.py on the Raspberry Pi): its address on your
# LAN, the port it was started with (--port), and the path of the API.
RECEIVER_URL = "http://192.168.1.20:5000/api/v1/readings"
# The bearer token the receiver is configured with.
TOKEN = "change-me"

# Stable id of this reader, the name its metrics get. None: "esp32-" and the
# chip's unique id (its MAC address), which survives reflashing.
DEVICE_ID = None

# Impulses per kWh, printed on the meter next to the LED (often 1000 or 3200).
IMP_PER_KWH = 1000

# The GPIO the sensor's output is wired to, the edge that starts a flash, and
# the internal pull resistor ("up", "down" or None). A phototransistor to GND
# with the pull-up: the pin falls when the LED flashes, so "falling". GPIOs
# 34 to 39 are input-only with no internal pulls: use an external resistor.
PULSE_PIN = 27
PULSE_EDGE = "falling"  # or "rising"
PULSE_PULL = "up"

# Edges closer than this to the previous pulse are bounce. 30 ms suits up to
# 25 kW at 3200 imp/kWh (a pulse every 45 ms); lower it for a three-phase
# supply with a faster meter (see pulse_logic.py).
MIN_GAP_MS = 30

# A reading every POST_INTERVAL_S seconds; posts time out after HTTP_TIMEOUT_S.
POST_INTERVAL_S = 10
HTTP_TIMEOUT_S = 10

# While the receiver is unreachable, keep up to BUFFER_CAPACITY readings (the
# oldest are dropped first: the energy is not lost, since every reading carries
# the cumulative pulse count) and send them BATCH_MAX at a time once it is back.
# About 250 bytes of RAM per reading: 120 readings are 20 minutes at 10 s.
BUFFER_CAPACITY = 120
BATCH_MAX = 20

# Retries wait BACKOFF_BASE_S, doubling up to BACKOFF_CAP_S, with jitter.
BACKOFF_BASE_S = 2
BACKOFF_CAP_S = 300

# Give up one Wi-Fi connection attempt after this long, then retry with backoff.
WIFI_CONNECT_TIMEOUT_S = 20

# NTP server (None: MicroPython's default pool) and how often to re-sync.
# Readings carry "ts" only once the clock has been set from NTP.
NTP_HOST = None
NTP_RESYNC_H = 6

# The watchdog resets the board if the main loop stalls this long. 0 turns it
# off, handy while developing: once started it cannot be stopped, so it also
# resets a board left at the REPL after Ctrl-C.
WDT_TIMEOUT_S = 60
