"""Base configuration: the Show-and-Tell captioner on the built-in shapes dataset.

Every other config imports this one and changes fields. Train with:

  python scripts/train.py --config configs/default.py --workdir workdirs/default

Any field can be overridden on the command line, e.g. `--config.batch_size=64`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # How the model trains (jaxcap/trainers/): 'images' (encoder and decoder on images, one
  # jitted step per host batch), 'features' (the decoder alone on cached embeddings of a frozen
  # encoder, resident on the devices) or 'scst' (self-critical fine-tuning of the decoder of
  # scst.init_from, on cached embeddings).
  config.trainer = 'images'
  # Global batch size, summed over all devices and hosts.
  config.batch_size = 128
  config.num_train_steps = 20_000
  config.log_every_steps = 100
  config.eval_every_steps = 2_000
  config.checkpoint_every_steps = 1_000
  # Checkpoints kept in WORKDIR/checkpoints; older ones are deleted, but for the best one.
  config.keep_checkpoints = 3
  # The best checkpoint: every evaluation step is checkpointed with the validation split's
  # (data.eval_splits[0]) metrics, and the one that scored best on `metric` ('max': highest,
  # 'min': lowest) is kept besides the latest. The final report scores the other eval splits
  # on it; evaluate.py, caption.py, serve.py, export.py and scst.init_from load it by default.
  # metric=None: no best is kept, and they load the latest.
  config.best_checkpoint = ml_collections.ConfigDict({
      'metric': ml_collections.FieldReference('cider', field_type=str), 'mode': 'max'})

  config.data = data = ml_collections.ConfigDict()
  # A tfds dataset with the features of `coco_captions`; 'shapes_captions' is built in.
  data.name = 'shapes_captions'
  # tfds data directory; None is tfds' default (~/tensorflow_datasets or $TFDS_DATA_DIR).
  data.data_dir = ml_collections.config_dict.placeholder(str)
  data.train_split = 'train'
  data.eval_splits = ('val', 'test')
  # Images are resized to image_size x image_size and scaled to [-1, 1].
  data.image_size = 64
  # Token rows are BOS, caption pieces, EOS, padding: at most max_len ids.
  data.max_len = 20
  # Upper bound of the sentencepiece vocabulary trained on the training captions.
  data.vocab_size = 10_000
  # 'bpe' or 'unigram'; bpe keeps whole words on small corpora.
  data.tokenizer_type = 'bpe'
  # coco_captions only: a COCO-format folder on disk, built without download: COCO 2014, a
  # subset of it, or your own images captioned in COCO's format (jaxcap/data/coco_local.py).
  data.coco_dir = ml_collections.config_dict.placeholder(str)
  # Its caption files and image folders, relative to coco_dir. val_annotations=None: one
  # annotation file, whose images are split into train, val and test by rule (README).
  data.coco_files = ml_collections.ConfigDict({
      'train_annotations': 'annotations/captions_train2014.json',
      'train_images': 'train2014',
      'val_annotations': ml_collections.FieldReference('annotations/captions_val2014.json',
                                                       field_type=str),
      'val_images': 'val2014',
  })
  # A caption JSON in Karpathy's schema (dataset_coco.json, dataset_flickr8k.json,
  # dataset_flickr30k.json or your own) and the folder of its images. When set, the dataset is
  # built from them with the file's splits, and data.name only labels it (jaxcap/data/karpathy.py).
  data.karpathy_json = ml_collections.config_dict.placeholder(str)
  data.image_dir = ml_collections.config_dict.placeholder(str)
  # Decoder training on cached features cuts each batch's token rows to the smallest of these
  # lengths that holds them all (rows are grouped by length), so no work is spent on padding.
  # (max_len,) turns it off.
  data.length_buckets = (8, 10, 12, 14, 16, 18)
  data.shuffle_buffer = 10_000
  # The training split is read as this many independently shuffled shards (0: one per process).
  # The batches depend on it, not on the number of hosts: fix it to train on 1 or N hosts alike.
  data.input_shards = 0
  # Training images are centre-cropped to a square; augment=True takes a random square of
  # augment_min_crop_fraction to 1 of the shorter side and flips it half the time instead.
  data.augment = False
  data.augment_min_crop_fraction = 0.8
  # Datasets built from files (coco_dir, karpathy_json): store each image with its shorter side
  # at this many pixels, once, when the dataset is built (None: as the files are). Training then
  # decodes a fraction of the pixels and resizes none: about 5x the images/s per CPU core for
  # COCO-sized JPEGs at 299 (docs/benchmarks.md, "The input pipeline").
  data.stored_image_size = ml_collections.config_dict.placeholder(int)
  # Keep decoded, resized images in memory after the first epoch (small datasets only).
  data.cache_images = True

  # Generation parameters of the built-in dataset (used when name == 'shapes_captions').
  data.shapes = shapes = ml_collections.ConfigDict()
  shapes.image_size = 64
  shapes.min_objects = 1
  # At most 4 objects per image.
  shapes.max_objects = 3
  shapes.seed = 0
  shapes.train_size = 20_000
  shapes.val_size = 1_000
  shapes.test_size = 1_000
  # True: two different objects per scene, and captions that also say where one is relative to
  # the other (left of / right of / above / below); evaluation adds `relation_accuracy`.
  shapes.relations = False

  config.model = model = ml_collections.ConfigDict()
  # 'show_tell': an LSTM started from the pooled image embedding (jaxcap/models/decoder.py);
  # 'updown': two LSTMs started from it, attending over the encoder's grid at every word
  # (jaxcap/models/updown.py).
  model.decoder = 'show_tell'
  # A name in jaxcap.models.encoders.ENCODERS: 'small_cnn', 'inception_v3', or 'zeros'
  # (ignores the image: the blind baseline).
  model.encoder = 'small_cnn'
  # False freezes the encoder (no gradient; batch norm uses moving statistics).
  model.train_encoder = True
  # Directory of converted encoder weights; None initialises the encoder randomly.
  model.encoder_weights = ml_collections.config_dict.placeholder(str)
  # Batch-norm moving-average momentum; short runs need a low value to track the weights.
  model.bn_momentum = 0.9
  model.small_cnn = ml_collections.ConfigDict({
      # Output channels of each conv -> batch norm -> ReLU block (a 2x2 max pool between blocks).
      'features': (32, 64, 128, 256),
      # True pools each block's conv output before batch norm and ReLU (faster on CPU).
      'pool_before_norm': False,
      # True: the first conv has stride 2 and downsamples instead of the first block's pool.
      'strided_first_conv': False,
  })
  # show_tell: image embedding -> Dense(image_bottleneck) -> Dense(lstm_size) = initial state.
  model.image_bottleneck = 120
  # Word embedding size (both decoders).
  model.embed_dim = 100
  # LSTM size (both decoders; updown's two LSTMs).
  model.lstm_size = 300
  # show_tell: LSTM output -> Dense(logit_bottleneck) -> logits.
  model.logit_bottleneck = 120
  # updown: size of the additive attention's hidden layer.
  model.attention_size = 128
  # updown: append each grid position's (row, column) to its features, so that the decoder
  # knows where it looked (False: Anderson et al.'s equations, as shared/peers/torch_updown.py).
  model.grid_coordinates = False
  # Training scores this many time steps of the vocabulary projection at a time, never holding
  # the whole (batch, time, vocab) logits (see jaxcap/models/softmax_loss.py).
  model.loss_chunk_steps = 1
  # Time steps per iteration of the LSTM's scan; 1 is fastest on CPU.
  model.lstm_unroll = 1
  # Dropout on the decoder's word embeddings and LSTM outputs during cross-entropy training
  # (not in evaluation or self-critical training). 0: none.
  model.dropout = 0.0
  # Compute dtype, 'float32' or 'bfloat16'; parameters and optimizer state stay float32.
  model.dtype = 'float32'

  config.optimizer = opt = ml_collections.ConfigDict()
  # 'adam' or 'adamw'.
  opt.name = 'adam'
  opt.learning_rate = 1e-3
  # Linear warmup from 0, then cosine decay to learning_rate * end_learning_rate_factor.
  opt.warmup_steps = 500
  opt.end_learning_rate_factor = 0.01
  # Used by adamw only.
  opt.weight_decay = 1e-4
  # Clip gradients to this global L2 norm; 0 disables clipping.
  opt.grad_clip_norm = 1.0

  config.decode = dec = ml_collections.ConfigDict()
  # How evaluation and scripts/caption.py generate captions: 'greedy', 'beam' or 'sample'.
  dec.method = 'greedy'
  dec.beam_size = 3
  # Beam hypotheses are ranked by log-probability / length ** length_penalty (0: raw).
  dec.length_penalty = 0.0
  # Softmax temperature of 'sample'.
  dec.temperature = 1.0

  config.features = feat = ml_collections.ConfigDict()
  # The feature cache of the 'features' and 'scst' trainers: every image encoded once by the
  # frozen encoder (scripts/extract_features.py, or at the start of training).
  # Where the cache lives; None: WORKDIR/features.
  feat.cache_dir = ml_collections.config_dict.placeholder(str)
  # On-disk dtype of the features ('float16' or 'bfloat16' halve the size; 'float32' is exact).
  # The 'updown' decoder's grids are 64 times an embedding's size for InceptionV3 (8 x 8).
  feat.storage_dtype = 'float16'
  # Global batch of images through the encoder while extracting.
  feat.batch_size = 256
  # Batches per part file: an interrupted extraction resumes after its last complete part.
  feat.batches_per_part = 20

  config.resident = res = ml_collections.ConfigDict()
  # The 'features' and 'scst' trainers (jaxcap/trainers/resident.py): optimizer steps
  # per jitted call. Logging, checkpoint and evaluation intervals are multiples of it.
  res.steps_per_call = 100

  config.scst = scst = ml_collections.ConfigDict()
  # The 'scst' trainer (jaxcap/trainers/scst.py): fine-tunes the decoder of a cross-entropy run
  # with the policy gradient of its sampled captions' CIDEr-D, computed on the device, on cached
  # features (model.train_encoder=False), resident.steps_per_call steps per call;
  # config.batch_size counts images, each with num_samples sampled captions.
  # Workdir of the cross-entropy run to start from: a checkpoint of it (the encoder stays at
  # its weights) and its tokenizer. The model fields must be the same as that run's.
  scst.init_from = ml_collections.config_dict.placeholder(str)
  # Its checkpoint to start from: 'best', 'latest' or a step number; None: its best where one
  # is recorded (config.best_checkpoint), else its latest.
  scst.init_from_step = ml_collections.config_dict.placeholder(str)
  # Captions sampled per image and step.
  scst.num_samples = 5
  # 'mean_of_others': each sample's baseline is the mean reward of the image's other samples;
  # 'greedy': the reward of the image's greedy caption (the original SCST).
  scst.baseline = 'mean_of_others'
  # Softmax temperature of the sampling.
  scst.temperature = 1.0
  # Sampled captions hold at most max_len - 1 ids after BOS (EOS included).
  scst.max_len = 20
  # Weight of a cross-entropy term added to the policy loss: each image's teacher-forced loss
  # on one of its references, drawn each step (a mixed objective, Paulus et al. 2018). 0: the
  # policy gradient alone; negative values are rejected. Keeps what CIDEr-D cannot tell apart,
  # such as word order.
  scst.xe_weight = 0.0

  config.eval = ev = ml_collections.ConfigDict()
  # Global evaluation batch size (images).
  ev.batch_size = 256
  # How periodic validation (data.eval_splits[0], every eval_every_steps and at the last step)
  # scores captions: 'pycocoevalcap' (BLEU-1..4, METEOR, ROUGE-L, CIDEr over words, computed on
  # the host while the accelerators wait: seconds for 5,000 images) or 'device' (only CIDEr-D
  # over token ids, `cider_d`, which every evaluation logs). The final report's other splits and
  # scripts/evaluate.py always have pycocoevalcap's metrics.
  ev.periodic_metrics = 'pycocoevalcap'
  # Generated captions printed beside their references at each evaluation.
  ev.num_printed_examples = 3
  return config
